"""facetool.bench."""
