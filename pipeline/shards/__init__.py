"""RecordIO (or an image folder, or a list file of images) -> WebDataset tar shards (format v1, see
docs/FORMAT.md): shuffled, indexed, parallel, resumable.

- ``format``: member and file names, DALI index lines, the manifest (``read_manifest``, ``merge_parts``);
- ``tar``: tar headers, index lines and ``ShardWriter``, which streams one tar;
- ``plan``: ``ConvertOptions``, ``Source`` (and the ``ConvertSource`` protocol), the seeded permutation and parts,
  the plan's identity; ``sources``: ``locate_source``, which kind of dataset ``convert`` was given;
- ``state``: the resumable state folder, and the checks that nothing of another plan is reused;
- ``write``: writing one shard; ``job``: ``convert()``, the whole job over a pool of worker processes;
"""

from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD
from facetool.pipeline.shards.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_EXTS,
    LABEL_EXT,
    LABEL_MAP,
    MASK_EXT,
    IndexMember,
    ShardStats,
    check_manifest,
    load_manifest,
    merge_parts,
    parse_index_line,
    read_manifest,
    shard_name,
)
from facetool.pipeline.shards.job import convert
from facetool.pipeline.shards.plan import (
    STATE_DIR,
    ConvertJob,
    ConvertOptions,
    ConvertSource,
    MaskPlan,
    Source,
    part_shards,
    plan_permutation,
)
from facetool.pipeline.shards.sources import locate_source
from facetool.pipeline.shards.tar import ShardWriter, tar_header, tar_headers
from facetool.pipeline.shards.write import write_shard

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_EXTS",
    "LABEL_EXT",
    "LABEL_MAP",
    "MASK_EXT",
    "STATE_DIR",
    "ConvertJob",
    "ConvertOptions",
    "ConvertSource",
    "IndexMember",
    "MaskPlan",
    "ShardStats",
    "ShardWriter",
    "Source",
    "check_manifest",
    "convert",
    "load_manifest",
    "locate_source",
    "merge_parts",
    "parse_index_line",
    "part_shards",
    "plan_permutation",
    "read_manifest",
    "shard_name",
    "tar_header",
    "tar_headers",
    "write_shard",
]
