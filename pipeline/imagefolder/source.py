"""An image folder or list file as a ``facetool convert`` source: the listing, and each image read, checked and
passed through unchanged when its shard is written.

An image is checked from its bytes without decoding it (the loaders decode it, once): JPEG or PNG by signature,
its size from the header (``PIL.Image.open`` reads only the header), and complete (a JPEG ends its last scan with
an end-of-image marker, a PNG with its ``IEND`` chunk), so a truncated file is found here, not in training.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from facetool.pipeline.imagefolder.listing import ImageListing, ListingProblem, list_folder, read_list
from facetool.pipeline.recordio.format import RecordIOError, image_extension

DEFAULT_IMAGE_SIZE = 112  # ArcFace-aligned faces
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC


def check_image(data: bytes, where: str, size: int = DEFAULT_IMAGE_SIZE) -> str:
    """The extension (``jpg``/``png``) of an image file's bytes, checked to be a complete ``size`` x ``size``
    JPEG or PNG from its header and end marker (no decoding); else a RecordIOError naming ``where``."""
    from PIL import Image

    ext = image_extension(data)
    if ext is None:
        raise RecordIOError(f"{where}: neither a JPEG nor a PNG image" if data else f"{where}: empty file")
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as img:
            width, height = img.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for a damaged header
        raise RecordIOError(f"{where}: cannot read the image header ({type(err).__name__}: {err})") from None
    if (width, height) != (size, size):
        raise RecordIOError(f"{where}: the image is {width}x{height}, not {size}x{size} (see --image-size)")
    if ext == "jpg":
        complete = data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0  # no marker can hide in scan data
    else:
        complete = data.rfind(_PNG_END) >= 0
    if not complete:
        raise RecordIOError(f"{where}: truncated (the image has no end marker)")
    return ext


class ImageSource:
    """The images of a folder ``ROOT/<identity>/<image>`` (layout ``folder``) or a list file (layout ``list``),
    as ``facetool.pipeline.shards.convert`` reads a source; also its own reader (records are the listing's
    images: key ``i`` is image ``i``). Sent whole to worker processes: nobody lists the folder twice."""

    def __init__(self, path: Path, layout: str, listing: ImageListing, image_size: int) -> None:
        self.path, self.layout, self.listing, self.image_size = path, layout, listing, image_size
        self.keys = np.arange(len(listing), dtype=np.int64)
        self.offsets = self.keys  # an image's "offset" is its place in the listing
        self.size = int(listing.sizes.sum())
        self.index_problems: list[ListingProblem] = listing.problems

    @classmethod
    def scan(
        cls, src: str | os.PathLike, root: str | os.PathLike | None, image_size: int, on_error: str
    ) -> ImageSource:
        """List the folder ``src`` (when it is a folder) or the list file ``src`` (paths relative to ``root``,
        default the list's folder)."""
        src = Path(src)
        if src.is_dir():
            return cls(src, "folder", list_folder(src, on_error), image_size)
        return cls(src, "list", read_list(src, root, on_error), image_size)

    # the source: what the plan and the manifest record
    def open(self, on_error: str) -> ImageSource:
        """The reader of this source: itself (the listing is already in memory)."""
        return self

    def num_classes(self, reader: object = None) -> int:
        """One class per identity (an identity without images has none)."""
        return len(self.listing.identities)

    def mtime_ns(self) -> int:
        """0: the listing's digest already covers every file's size and modification time."""
        return 0

    def index_digest(self) -> str:
        """A sha256 of the listing: what identifies the images a plan was made from."""
        return self.listing.digest()

    def arguments(self) -> dict:
        """The settings of this source that the manifest records among the arguments."""
        found = {"image_size": self.image_size}
        if self.layout == "list":
            found["root"] = str(self.listing.root.resolve())
        return found

    def label_map(self) -> str:
        """The identity -> label map (JSON, in label order) written beside the manifest."""
        table = {name: label for label, name in enumerate(self.listing.identities)}
        return json.dumps(table, indent=1, ensure_ascii=False) + "\n"

    # the reader: what the shard writer reads
    def __len__(self) -> int:
        return len(self.listing)

    def where(self, key: int) -> str:
        """A record as error messages name it: its file (and list line)."""
        return self.listing.where(int(key))

    def simple_jpegs(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """None of these images lies in a mapped file: every one takes the shard writer's checked path."""
        n = len(offsets)
        return np.zeros(n, dtype=bool), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float32)

    def read_at(self, key: int, offset: int) -> tuple[tuple[float, ...], bytes]:
        """The label and the unchanged bytes of image ``offset``, checked (``check_image``) and of the size it
        was listed with; a problem is a RecordIOError naming the file."""
        i = int(offset)
        where = self.listing.where(i)
        try:
            with open(self.listing.root / self.listing.name(i), "rb") as f:
                data = f.read()
        except OSError as err:
            raise RecordIOError(f"{where}: cannot read ({err.strerror})") from None
        if len(data) != self.listing.sizes[i]:
            raise RecordIOError(
                f"{where}: holds {len(data)} bytes, {int(self.listing.sizes[i])} when the conversion was planned "
                "(the file changed)"
            )
        check_image(data, where, self.image_size)
        return (float(self.listing.labels[i]),), data

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
