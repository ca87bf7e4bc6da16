"""facetool.pipeline."""
