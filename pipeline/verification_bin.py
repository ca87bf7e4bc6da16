"""InsightFace verification ``.bin`` files: a pickle of ``(images, issame)``, loaded without running code, written
as InsightFace writes them, and made from a pairs list of image files (:func:`make_bin`).

A ``.bin`` from the internet is untrusted: the loader's unpickler admits only bytes, lists, tuples, bools and numpy
arrays (the handful of numpy globals that rebuild an array), so a pickle naming any other global (``os.system``,
``builtins.eval``, ...) is refused before anything is constructed. Python 2-era files, whose images are ``str``,
load with ``encoding="bytes"``; images may be bytes or numpy uint8 arrays (InsightFace's newer builder), ``issame`` a
list of bools or a numpy bool array.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetool.pipeline.atomic import Progress, atomic_open
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.pairs import parse_pairs_list, read_text
from facetool.pipeline.recordio.format import image_extension

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

# (module, name) pairs a verification .bin may reference, and only these.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _multiarray._reconstruct for m in _NUMPY_CORE},
    **{(m, "scalar"): _multiarray.scalar for m in _NUMPY_CORE},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"): harmless, needed.
    ("_codecs", "encode"): __import__("codecs").encode,
}
_ALLOWED_DTYPES = {np.dtype(np.uint8), np.dtype(np.bool_), np.dtype(np.int8)}


class UnsafePickleError(FacetoolError):
    """The pickle references something other than bytes, lists, bools and numpy arrays."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``; anything else is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        if isinstance(module, bytes):
            module = module.decode("latin1")
        if isinstance(name, bytes):
            name = name.decode("latin1")
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused: the pickle references {module}.{name}; a verification .bin may hold "
                "only bytes, lists, bools and numpy arrays"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self._source}: refused: the pickle uses persistent ids")


def restricted_loads(data: bytes, source: str = "<bytes>") -> object:
    """Unpickle ``data`` admitting only bytes, lists, tuples, bools and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # any malformed pickle: one clear line, never a traceback
        raise FacetoolError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class VerificationSet:
    """A loaded ``.bin``: 2P encoded images (pair k is images 2k and 2k+1) and P same/different flags."""

    name: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


def set_name(path: str | os.PathLike) -> str:
    """The set's name from its file name (``lfw.bin`` -> ``lfw``)."""
    return Path(path).name.removesuffix(".bin")


def load_bin(path: str | os.PathLike) -> VerificationSet:
    """Load and validate a verification ``.bin`` with the restricted unpickler."""
    path = Path(path)
    name = set_name(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror})") from None
    obj = restricted_loads(data, str(path))
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise FacetoolError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    raw_images, raw_issame = obj
    if not isinstance(raw_images, list | tuple | np.ndarray):
        raise FacetoolError(f"{path}: images must be a list, got {type(raw_images).__name__}")
    images: list[bytes] = []
    for i, img in enumerate(raw_images):
        if isinstance(img, bytes | bytearray):
            images.append(bytes(img))
        elif isinstance(img, np.ndarray) and img.dtype in _ALLOWED_DTYPES and img.ndim == 1:
            images.append(img.astype(np.uint8, copy=False).tobytes())
        else:
            raise FacetoolError(
                f"{path}: set {name!r}, image {i}: expected encoded bytes or a 1-D uint8 array, "
                f"got {type(img).__name__}"
            )
    if isinstance(raw_issame, np.ndarray):
        if raw_issame.dtype != np.bool_ or raw_issame.ndim != 1:
            raise FacetoolError(f"{path}: set {name!r}: issame must be a 1-D bool array, got {raw_issame.dtype}")
        issame = raw_issame.copy()
    elif isinstance(raw_issame, list | tuple) and all(isinstance(v, bool | np.bool_) for v in raw_issame):
        issame = np.asarray(raw_issame, dtype=bool)
    else:
        raise FacetoolError(f"{path}: set {name!r}: issame must be a list of bools or a numpy bool array")
    if len(images) != 2 * issame.size:
        first = min(len(images), 2 * issame.size)
        which = (
            f"image {first} onwards belongs to no pair"
            if len(images) > first
            else f"pair {first // 2} lacks image {first}" + ("" if first % 2 else f" and {first + 1}")
        )
        raise FacetoolError(
            f"{path}: set {name!r}: {len(images)} images for {issame.size} pairs (need exactly twice as many; {which})"
        )
    return VerificationSet(name, images, issame)


def write_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool] | np.ndarray) -> None:
    """Write ``(images, issame)`` as InsightFace does (bytes images, bool list), atomically."""
    if len(images) != 2 * len(issame):
        raise FacetoolError(f"{path}: {len(images)} images for {len(issame)} pairs (need exactly twice as many)")
    with atomic_open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(v) for v in issame]), f, protocol=4)


def bin_image(data: bytes, where: str) -> tuple[bytes, bool]:
    """(the bytes a ``.bin`` holds for this image file, whether they were re-encoded): JPEG and PNG unchanged once
    they decode, any other format PIL reads re-encoded as PNG (lossless, RGB). Undecodable is an error at ``where``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if image_extension(data) is not None:
                return data, False
            out = io.BytesIO()
            img.convert("RGB").save(out, format="PNG")
            return out.getvalue(), True
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise FacetoolError(f"{where}: cannot decode the image ({type(err).__name__}: {err})") from None


def make_bin(
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    root: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write the pairs list ``pairs`` (lines ``path1 path2 label``, 1 same / 0 different; paths inside ``root``,
    default the list's folder) as an InsightFace ``.bin`` at ``out``: images 2k and 2k+1 are pair k's, in the list's
    order (see :func:`bin_image`). A missing, unreadable or undecodable image is an error naming its line.
    ``progress(done, total)`` counts distinct images. Returns the counts."""
    parsed = parse_pairs_list(read_text(pairs), pairs, root)
    base = Path(root) if root is not None else Path(pairs).parent
    encoded, reencoded = [], 0
    for i, (rel, line) in enumerate(zip(parsed.names, parsed.lines, strict=True)):
        where = f"{pairs} line {line}: image {rel!r}"
        try:
            data = (base / rel).read_bytes()
        except OSError as err:
            raise FacetoolError(f"{where}: cannot read ({err.strerror or err})") from None
        image, changed = bin_image(data, where)
        encoded.append(image)
        reencoded += changed
        if progress is not None:
            progress(i + 1, len(parsed.names))
    images = [encoded[j] for pair in parsed.pairs for j in pair]
    write_bin(out, images, parsed.issame)
    same = sum(parsed.issame)
    return {"pairs": len(parsed.pairs), "same": same, "images": len(parsed.names), "reencoded": reencoded}
