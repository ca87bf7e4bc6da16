"""Face alignment from five landmarks onto the ArcFace template, with numpy and Pillow only (no OpenCV).

InsightFace aligns a face by the least-squares similarity (rotation, uniform scale, translation) that maps its five
points (left eye, right eye, nose tip, left and right mouth corner) onto the ArcFace 112x112 template, estimated
with scikit-image's ``SimilarityTransform.estimate`` (Umeyama's method), and warps the image with
``cv2.warpAffine`` (bilinear, constant border 0): ``python-package/insightface/utils/face_align.py`` (``estimate_norm``,
``norm_crop``) and ``recognition/arcface_torch/eval_ijbc.py`` (``Embedding.get``, which also reduces 68 points to
five) in github.com/deepinsight/insightface @ 7fadd420c2351d0ffa8cac403421c1a3ed733365. Here the similarity is
the closed-form complex least-squares fit (the same minimiser as Umeyama's without reflection) and the warp is a
float bilinear resampling in OpenCV's pixel convention (pixel centres at integer coordinates); OpenCV quantises
the sample positions to 1/32 pixel and the weights to fixed point, so pixels agree within a few grey levels on
sharp edges and exactly on flat regions.

A landmark list holds one face a line: ``path x1 y1 ... x5 y5 [score]`` (IJB's ``*_name_5pts_score.txt``), or 68
points instead of five. :func:`align_list` writes every face of a list, aligned, under an output folder.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from facetool.pipeline.atomic import Progress, write_bytes_atomic
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.template import TEMPLATE, TEMPLATE_SIZE

#: JPEG quality of aligned faces written as JPEG.
JPEG_QUALITY = 95
#: The 68-point indices that make the five points: eye corners (averaged), nose tip, mouth corners.
_EYES_68 = ((36, 39), (42, 45))
_NOSE_68, _MOUTH_68 = 30, (48, 54)
#: Numbers on a list line -> (landmarks, whether a detector score ends the line).
_LAYOUTS = {10: (5, False), 11: (5, True), 136: (68, False), 137: (68, True)}


def template_points(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The five template points for a ``size`` x ``size`` crop, as InsightFace's ``estimate_norm``: multiples of 112
    scale the 112 template; multiples of 128 scale it as a 128 crop (8 pixels wider on each side)."""
    if size > 0 and size % 112 == 0:
        return TEMPLATE * (size / 112.0)
    if size > 0 and size % 128 == 0:
        ratio = size / 128.0
        return (TEMPLATE + [8.0, 0.0]) * ratio
    raise FacetoolError(f"aligned size {size}: must be a multiple of 112 or 128 (as InsightFace's norm_crop)")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity mapping points ``src`` onto ``dst`` ((K, 2) each).

    Points are read as complex numbers: ``dst ~ a * src + b`` with complex ``a`` (scale and rotation) is linear
    least squares, ``a = sum(conj(s) d) / sum(|s|^2)`` over the centred points."""
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    zs = s[:, 0] + 1j * s[:, 1]
    zd = d[:, 0] + 1j * d[:, 1]
    cs, cd = zs.mean(), zd.mean()
    denom = float(np.sum(np.abs(zs - cs) ** 2))
    if denom == 0.0:
        raise FacetoolError("landmarks coincide: no similarity transform")
    a = np.sum(np.conj(zs - cs) * (zd - cd)) / denom
    b = cd - a * cs
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix, as a 2x3 matrix."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def five_points(points: np.ndarray) -> np.ndarray:
    """(..., 5, 2) landmarks as they are, or the five points of (..., 68, 2) ones (eye centres from the corners)."""
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-2:] == (68, 2):
        eyes = [(p[..., i, :] + p[..., j, :]) / 2 for i, j in _EYES_68]
        return np.stack([*eyes, p[..., _NOSE_68, :], p[..., _MOUTH_68[0], :], p[..., _MOUTH_68[1], :]], axis=-2)
    if p.shape[-2:] != (5, 2):
        raise FacetoolError(f"expected 5 or 68 landmarks (x, y), got shape {p.shape}")
    return p


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) uint8 warped by ``matrix`` (2x3, source to output pixels) into ``size`` = (width,
    height): each output pixel samples the source bilinearly at the inverse-mapped point; outside is 0."""
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    h, w = img.shape[:2]
    out_w, out_h = size
    inv = invert_affine(matrix)
    v, u = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2] + 1.0  # + 1: coordinates in the zero-padded image
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2] + 1.0
    inside = (x > 0) & (x < w + 1) & (y > 0) & (y < h + 1)
    x0 = np.clip(np.floor(x), 0, w).astype(np.intp)
    y0 = np.clip(np.floor(y), 0, h).astype(np.intp)
    fx = np.where(inside, x - x0, 0.0)[..., None]
    fy = np.where(inside, y - y0, 0.0)[..., None]
    padded = np.zeros((h + 2, w + 2, img.shape[2]), dtype=np.float64)
    padded[1:-1, 1:-1] = img
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    out = (top * (1 - fy) + bottom * fy) * inside[..., None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


def alignment_matrix(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2x3 similarity taking a face's landmarks (5 or 68 points) onto the template of a ``size`` crop."""
    return similarity_transform(five_points(landmarks), template_points(size))


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` ArcFace-aligned crop of the face with ``landmarks`` in ``image`` (RGB uint8)."""
    return warp_affine(image, alignment_matrix(landmarks, size), (size, size))


@dataclass
class LandmarkList:
    """A landmark list file: one name, its landmarks ((N, 5, 2) float64) and optional detector scores per face;
    ``lines`` holds the line number of each face (blank lines are skipped) for error messages."""

    path: Path
    names: list[str]
    points: np.ndarray
    scores: np.ndarray | None
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def where(self, i: int) -> str:
        """``list.txt:LINE`` of face ``i``."""
        return f"{self.path}:{int(self.lines[i])}"


def _check_fields(tokens: list[str], where: str, require_score: bool, width: int | None) -> None:
    """A line's field count must be a layout (5 or 68 points, with or without a score) and the first line's."""
    points, has_score = _LAYOUTS.get(len(tokens) - 1, (0, False))
    if not points or (require_score and not has_score):
        need = "x1 y1 ... x5 y5 score" if require_score else "x1 y1 ... x5 y5 [score]"
        raise FacetoolError(f"{where}: expected 'name {need}', got {len(tokens)} fields")
    if width is not None and len(tokens) != width:
        if _LAYOUTS[width - 1][0] == points:
            raise FacetoolError(f"{where}: a detector score on some lines but not on others")
        raise FacetoolError(f"{where}: {points} landmarks here, {_LAYOUTS[width - 1][0]} on the first line")


def _bad_number(rows: list[list[str]], path: Path, lines: list[int]) -> FacetoolError:
    """The error for the first non-number or non-finite value (the slow path after a failed bulk conversion)."""
    for tokens, lineno in zip(rows, lines, strict=True):
        for t in tokens:
            try:
                value = float(t)
            except ValueError:
                return FacetoolError(f"{path}:{lineno}: {t!r} is not a number")
            if not math.isfinite(value):
                return FacetoolError(f"{path}:{lineno}: landmarks and score must be finite numbers")
    return FacetoolError(f"{path}: cannot read the landmarks as numbers")


def iter_fields(path: str | os.PathLike, sep: str | None = None, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line after the first ``skip`` lines; read errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if lineno > skip and line.strip():
                    yield lineno, line.split(sep)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise FacetoolError(f"{path}: not a UTF-8 text file ({err.reason})") from None


def read_landmark_list(path: str | os.PathLike, require_score: bool = False) -> LandmarkList:
    """Read a list of ``name x1 y1 ... x5 y5 [score]`` lines (or 68 points; every line alike); a malformed line is
    a one-line :class:`FacetoolError` naming the file and line. The numbers are converted in one numpy call."""
    path = Path(path)
    names, rows, lines = [], [], []
    width = None
    for lineno, tokens in iter_fields(path):
        if len(tokens) != width:
            _check_fields(tokens, f"{path}:{lineno}", require_score, width)
            width = len(tokens)
        names.append(tokens[0])
        rows.append(tokens[1:])
        lines.append(lineno)
    if width is None:
        raise FacetoolError(f"{path}: no faces listed")
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        raise _bad_number(rows, path, lines) from None
    if not np.isfinite(values).all():
        raise _bad_number(rows, path, lines)
    points, has_score = _LAYOUTS[width - 1]
    return LandmarkList(
        path=path,
        names=names,
        points=five_points(values[:, : 2 * points].reshape(-1, points, 2)),
        scores=values[:, -1].copy() if has_score else None,
        lines=np.array(lines, dtype=np.int64),
    )


def read_rgb(path: str | os.PathLike, where: str) -> np.ndarray:
    """An image file as RGB uint8, turned upright by its EXIF orientation (as ``cv2.imread`` does)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except OSError as err:
        if err.errno is not None:  # the file system's error; PIL's decoding errors are OSErrors without errno
            raise FacetoolError(f"{where}: cannot read image {path} ({err.strerror or err})") from None
        raise FacetoolError(f"{where}: cannot decode image {path} ({err})") from None
    except Exception as err:  # PIL raises ValueError, SyntaxError, DecompressionBombError... for bad bytes
        raise FacetoolError(f"{where}: cannot decode image {path} ({type(err).__name__}: {err})") from None


def relative_name(name: str, where: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside the folder it is joined to; absolute or ``..`` is refused."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts or (p.parts[0].endswith(":")):
        raise FacetoolError(f"{where}: {name!r} must be a relative path inside the folder (no '..', not absolute)")
    return p


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """``image`` (RGB uint8) encoded as ``"PNG"`` or ``"JPEG"`` (quality :data:`JPEG_QUALITY`)."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _output_name(name: PurePosixPath, png: bool, where: str) -> tuple[PurePosixPath, str]:
    """Where an aligned face goes and in which format: ``.png`` with ``png``, else the format of its suffix."""
    if png:
        return name.with_suffix(".png"), "PNG"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(name.suffix.lower())
    if fmt is None:
        raise FacetoolError(f"{where}: cannot write {str(name)!r} as JPEG or PNG by its suffix (use --png)")
    return name, fmt


def align_list(
    list_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    size: int = TEMPLATE_SIZE,
    png: bool = False,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Align every face of the landmark list ``list_path`` (images under ``root``, default the list's folder) and
    write it to ``out_dir`` under the same relative name (``.png`` with ``png``); each file is written atomically.
    Returns ``{"images": N, "size": size}``."""
    faces = read_landmark_list(list_path)
    template_points(size)  # a bad size fails before any work
    root = Path(root) if root is not None else Path(list_path).parent
    out_dir = Path(out_dir)
    targets = []
    for i, name in enumerate(faces.names):  # every name is checked before the first file is written
        rel = relative_name(name, faces.where(i))
        targets.append((rel, *_output_name(rel, png, faces.where(i))))
    for i, (rel, out_name, fmt) in enumerate(targets):
        image = read_rgb(root / rel, faces.where(i))
        aligned = align_face(image, faces.points[i], size)
        dest = out_dir / out_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dest, encode_image(aligned, fmt))
        if progress is not None:
            progress(i + 1, len(targets))
    return {"images": len(targets), "size": size}


__all__ = [
    "JPEG_QUALITY",
    "TEMPLATE",
    "TEMPLATE_SIZE",
    "LandmarkList",
    "align_face",
    "align_list",
    "alignment_matrix",
    "encode_image",
    "five_points",
    "invert_affine",
    "iter_fields",
    "read_landmark_list",
    "read_rgb",
    "relative_name",
    "similarity_transform",
    "template_points",
    "warp_affine",
]
