"""Your own faces as a dataset: a folder ``ROOT/<identity>/<image>.(jpg|png)`` or a list file of
``relative/path label`` lines, listed compactly and checked (``listing``), and read as a ``facetool convert``
source whose image bytes pass through unchanged (``source``).
"""

from facetool.pipeline.imagefolder.listing import (
    IMAGE_SUFFIXES,
    MAX_LINE_BYTES,
    ImageListing,
    ListingProblem,
    is_image_folder,
    list_folder,
    read_list,
)
from facetool.pipeline.imagefolder.source import DEFAULT_IMAGE_SIZE, ImageSource, check_image

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "MAX_LINE_BYTES",
    "ImageListing",
    "ImageSource",
    "ListingProblem",
    "check_image",
    "is_image_folder",
    "list_folder",
    "read_list",
]
