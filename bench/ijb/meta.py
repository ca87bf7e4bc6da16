"""Readers of InsightFace's IJB-B / IJB-C meta files, strict: a malformed line is one error naming file and line.

Layout under ``IJB_DIR`` (target ``IJBC`` or ``IJBB``, written lower-case in file names), as
``recognition/arcface_torch/eval_ijbc.py`` and ``recognition/_evaluation_/ijb/ijb_evals.py`` read it
(github.com/deepinsight/insightface @ 7fadd420c2351d0ffa8cac403421c1a3ed733365):

- ``meta/<t>_face_tid_mid.txt``: ``image template_id media_id``, one image a line;
- ``meta/<t>_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 detector_score``, the same images in the same order;
- ``meta/<t>_template_pair_label.txt``: ``template_id_1 template_id_2 label`` (1 genuine, 0 impostor);
- for 1:N, ``meta/<t>_1N_gallery_G1.csv`` and ``G2`` (IJB-B: ``S1``, ``S2``) and ``meta/<t>_1N_probe_mixed.csv``:
  a header line, then ``TEMPLATE_ID,SUBJECT_ID,...`` rows (one per image; a template's subject is taken from its
  first row);
- ``loose_crop/<image>``: the images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetool.pipeline.align import LandmarkList, iter_fields, read_landmark_list
from facetool.pipeline.errors import FacetoolError

TARGETS = ("IJBC", "IJBB")
#: The two 1:N galleries of each target, by the names of their files.
GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
IMAGE_FOLDER = "loose_crop"


def meta_file(ijb_dir: str | os.PathLike, target: str, suffix: str) -> Path:
    """``IJB_DIR/meta/<target lower-case>_<suffix>``, e.g. ``meta/ijbc_face_tid_mid.txt``."""
    return Path(ijb_dir) / "meta" / f"{target.lower()}_{suffix}"


@dataclass
class TemplateSubjects:
    """A 1:N list: the template and subject id of each row, and the row's line number."""

    path: Path
    templates: np.ndarray
    subjects: np.ndarray
    lines: np.ndarray


@dataclass
class IJBMeta:
    """Everything the protocol reads: per image (in the order of the 5-point file) its name and landmarks
    (``images``; None for a synthetic set), detector score, template and media; the template pairs and their
    labels; the 1:N lists when present."""

    target: str
    images: LandmarkList | None
    scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_path: Path
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    labels: np.ndarray
    galleries: dict[str, TemplateSubjects] | None = None
    probes: TemplateSubjects | None = None


def _int(token: str, where: str, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise FacetoolError(f"{where}: {what} {token!r} is not an integer") from None
    if not -(2**63) <= value < 2**63:
        raise FacetoolError(f"{where}: {what} {token} is out of range")
    return value


def read_tid_mid(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``image template_id media_id`` lines: (names, templates, medias, line numbers)."""
    path = Path(path)
    names, ids, lines = [], [], []
    for lineno, parts in iter_fields(path):
        if len(parts) != 3:
            raise FacetoolError(f"{path}:{lineno}: expected 'image template_id media_id', got {len(parts)} fields")
        names.append(parts[0])
        ids.append(parts[1:])
        lines.append(lineno)
    if not names:
        raise FacetoolError(f"{path}: no images listed")
    try:
        values = np.array(ids, dtype=np.int64)  # one conversion; the loop below only runs to name a bad line
    except (ValueError, OverflowError):
        for (template, media), lineno in zip(ids, lines, strict=True):
            _int(template, f"{path}:{lineno}", "template id")
            _int(media, f"{path}:{lineno}", "media id")
        raise FacetoolError(f"{path}: cannot read the ids as integers") from None
    return names, values[:, 0].copy(), values[:, 1].copy(), np.array(lines, np.int64)


def _scan_pair_lines(path: Path) -> None:
    """Find the first malformed line of a pair list and raise its error (the slow path after a failed fast parse)."""
    for lineno, parts in iter_fields(path):
        where = f"{path}:{lineno}"
        if len(parts) != 3:
            raise FacetoolError(f"{where}: expected 'template_id_1 template_id_2 label', got {len(parts)} fields")
        for token, what in zip(parts, ("template id", "template id", "label"), strict=True):
            _int(token, where, what)


def record_line(path: str | os.PathLike, index: int) -> int:
    """The line number of record ``index`` (0-based, blank lines not counted) of a text file."""
    for seen, (lineno, _) in enumerate(iter_fields(Path(path))):
        if seen == index:
            return lineno
    raise IndexError(index)


def read_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t1 t2 label`` lines, parsed by numpy's C reader (15.7 M lines in seconds): (t1, t2, labels as int8)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we say so below
            arr = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, OverflowError, UnicodeDecodeError) as err:
        _scan_pair_lines(path)
        raise FacetoolError(f"{path}: cannot parse ({err})") from None
    if arr.size == 0:
        raise FacetoolError(f"{path}: no template pairs listed")
    if arr.shape[1] != 3:
        _scan_pair_lines(path)
    bad = np.flatnonzero((arr[:, 2] != 0) & (arr[:, 2] != 1))
    if bad.size:
        line = record_line(path, int(bad[0]))
        raise FacetoolError(f"{path}:{line}: label {arr[bad[0], 2]} is neither 1 (genuine) nor 0 (impostor)")
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(np.int8)


def read_template_subjects(path: str | os.PathLike) -> TemplateSubjects:
    """A 1:N csv file: a header line, then ``TEMPLATE_ID,SUBJECT_ID,...`` rows."""
    path = Path(path)
    templates, subjects, lines = [], [], []
    for lineno, parts in iter_fields(path, sep=",", skip=1):
        where = f"{path}:{lineno}"
        if len(parts) < 2:
            raise FacetoolError(f"{where}: expected 'TEMPLATE_ID,SUBJECT_ID,...', got {','.join(parts).strip()!r}")
        templates.append(_int(parts[0].strip(), where, "template id"))
        subjects.append(_int(parts[1].strip(), where, "subject id"))
        lines.append(lineno)
    if not templates:
        raise FacetoolError(f"{path}: no templates listed")
    return TemplateSubjects(path, np.array(templates, np.int64), np.array(subjects, np.int64), np.array(lines))


def _check_same_images(tid_path: Path, names: list[str], lines: np.ndarray, images: LandmarkList) -> None:
    if len(names) != len(images):
        raise FacetoolError(
            f"{tid_path}: {len(names):,} images, but {images.path} lists {len(images):,}; the two files describe "
            "the same images in the same order"
        )
    bad = next((i for i, (a, b) in enumerate(zip(names, images.names, strict=True)) if a != b), None)
    if bad is not None:
        raise FacetoolError(
            f"{tid_path}:{lines[bad]}: image {names[bad]!r}, but {images.where(bad)} has {images.names[bad]!r} "
            "(the two files must list the same images in the same order)"
        )


def _check_pair_templates(path: Path, t1: np.ndarray, t2: np.ndarray, templates: np.ndarray, tid: Path) -> None:
    known = np.unique(templates)
    for column in (t1, t2):
        bad = np.flatnonzero(~np.isin(column, known))
        if bad.size:
            line = record_line(path, int(bad[0]))
            raise FacetoolError(f"{path}:{line}: template {column[bad[0]]} has no image in {tid}")


def read_one_to_n(ijb_dir: str | os.PathLike, target: str) -> tuple[dict[str, TemplateSubjects], TemplateSubjects]:
    """The two 1:N galleries and the mixed probes, or an error naming the missing file."""
    names = [f"1N_gallery_{g}.csv" for g in GALLERIES[target]] + ["1N_probe_mixed.csv"]
    lists = [read_template_subjects(meta_file(ijb_dir, target, n)) for n in names]
    return dict(zip(GALLERIES[target], lists[:2], strict=True)), lists[2]


def has_one_to_n(ijb_dir: str | os.PathLike, target: str) -> bool:
    """Whether any 1:N file is there (then all three must be)."""
    names = [f"1N_gallery_{g}.csv" for g in GALLERIES[target]] + ["1N_probe_mixed.csv"]
    return any(meta_file(ijb_dir, target, n).exists() for n in names)


def read_meta(ijb_dir: str | os.PathLike, target: str = "IJBC", one_to_n: bool = True) -> IJBMeta:
    """Read and cross-check the meta files of ``target`` under ``ijb_dir`` (see the module docstring)."""
    if target not in TARGETS:
        raise FacetoolError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    tid = meta_file(ijb_dir, target, "face_tid_mid.txt")
    pts = meta_file(ijb_dir, target, "name_5pts_score.txt")
    pair_path = meta_file(ijb_dir, target, "template_pair_label.txt")
    for p in (tid, pts, pair_path):
        if not p.is_file():
            raise FacetoolError(
                f"{p}: not found (InsightFace's IJB layout: meta/{target.lower()}_<file> under IJB_DIR)"
            )
    names, templates, medias, lines = read_tid_mid(tid)
    images = read_landmark_list(pts, require_score=True)
    _check_same_images(tid, names, lines, images)
    t1, t2, labels = read_pairs(pair_path)
    _check_pair_templates(pair_path, t1, t2, templates, tid)
    genuine = int(labels.sum())
    if genuine == 0 or genuine == labels.size:
        raise FacetoolError(f"{pair_path}: needs both genuine (1) and impostor (0) pairs, has {genuine:,} genuine")
    meta = IJBMeta(target, images, images.scores, templates, medias, pair_path, t1, t2, labels)
    if one_to_n and has_one_to_n(ijb_dir, target):
        meta.galleries, meta.probes = read_one_to_n(ijb_dir, target)
    return meta


__all__ = [
    "GALLERIES",
    "IMAGE_FOLDER",
    "TARGETS",
    "IJBMeta",
    "TemplateSubjects",
    "has_one_to_n",
    "meta_file",
    "read_meta",
    "read_one_to_n",
    "read_pairs",
    "read_template_subjects",
    "read_tid_mid",
    "record_line",
]
