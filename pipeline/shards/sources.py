"""Which kind of dataset ``facetool convert`` was given, told by content: an InsightFace RecordIO set (a folder
with ``train.rec``/``train.idx``, or a ``.rec``), an image folder ``ROOT/<identity>/<image>`` (a folder without
them whose subfolders hold images) or a list file of ``relative/path label`` lines (any other file)."""

from __future__ import annotations

import os
from pathlib import Path

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.imagefolder import DEFAULT_IMAGE_SIZE, ImageSource, is_image_folder
from facetool.pipeline.shards.plan import ConvertOptions, ConvertSource, Source


def locate_source(src: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions) -> ConvertSource:
    """The source ``src`` as ``convert`` reads it (an image folder or list file is listed now); options that do
    not apply to it, and an output folder inside an image folder, are one-line errors."""
    src = Path(src)
    recordio = src.suffix == ".rec" if src.is_file() else (src / "train.rec").exists() or (src / "train.idx").exists()
    if src.is_dir() and not recordio and not is_image_folder(src):
        raise FacetoolError(
            f"{src}: neither a RecordIO dataset folder (with train.rec) nor an image folder "
            "(SRC/<identity>/<image>.jpg|png)"
        )
    if recordio or not src.exists():
        if options.image_size is not None or options.root is not None:
            raise FacetoolError(f"{src}: --image-size and --root apply to image folders and list files only")
        return Source.locate(src, options.use_index)
    if src.is_dir():
        if options.root is not None:
            raise FacetoolError(f"{src}: --root applies to list files only (an image folder is its own root)")
        if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(src)):
            raise FacetoolError(f"{out}: the output folder lies inside the image folder {src}; write it elsewhere")
    return ImageSource.scan(src, options.root, options.image_size or DEFAULT_IMAGE_SIZE, options.on_error)
