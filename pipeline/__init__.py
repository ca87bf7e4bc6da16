"""facetool.pipeline: RecordIO, .bin files, synthetic faces, shard writing (imports neither train nor bench)."""

DEFAULT_SAMPLES_PER_SHARD = 30_000  # ~250 MB shards of 112x112 JPEGs (about 8 KB a sample with tar headers)
