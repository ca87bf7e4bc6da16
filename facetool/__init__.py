"""facetool: face-recognition training at scale (RecordIO -> WebDataset shards -> DALI -> margin heads)."""

__version__ = "0.1.0"
