"""Allow ``python -m facetool``."""

from facetool.cli import main

main()
