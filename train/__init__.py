"""facetool.train."""
