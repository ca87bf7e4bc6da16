"""A small IJB-layout folder made of synthetic faces, with known landmarks: the test set of ``bench ijb``.

Each face is a synthetic aligned 112x112 face (:func:`facetool.pipeline.synth.render`) put into a larger loose
crop by a random similarity (rotation, scale, shift) that is recorded: its five landmarks are the ArcFace template
points carried by that similarity, so aligning the crop from them gives the face back. Every subject has a gallery
template (a still and a three-frame video) and probe templates (one or two media of one or two frames); template,
media and subject ids are sparse. Pairs are every gallery template against every probe template (genuine when the
subject is the same), in random order; detector scores lie in [0.6, 1]. With ``one_to_n`` the 1:N lists are
written too: the first half of the subjects form gallery 1, the rest gallery 2, every probe template is a probe.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from facetool.pipeline.align import TEMPLATE, encode_image, warp_affine
from facetool.pipeline.atomic import Progress, write_bytes_atomic
from facetool.pipeline.errors import FacetoolError

from .meta import GALLERIES, IMAGE_FOLDER, TARGETS, meta_file

#: Media of a gallery template (frames per media) and the choices for a probe template's media.
GALLERY_MEDIA = (1, 3)
PROBE_MEDIA = ((1,), (2,), (1, 1), (1, 2))


def loose_crop(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(loose crop, its five landmarks): ``face`` (aligned 112x112 RGB) warped by a random similarity onto a canvas
    of 150-220 pixels a side; the landmarks are the template points under the same similarity."""
    width, height = (int(v) for v in rng.integers(150, 221, 2))
    scale, angle = rng.uniform(1.1, 1.5), rng.uniform(-0.35, 0.35)
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([width / 2, height / 2]) + rng.uniform(-8, 8, 2)
    matrix = np.c_[a, centre - a @ [56.0, 56.0]]
    return warp_affine(face, matrix, (width, height)), TEMPLATE @ a.T + matrix[:, 2]


def _plan(subjects: int, probes_per_subject: int, rng: np.random.Generator) -> list[dict]:
    """Templates: subject, gallery or probe, frames per media (gallery templates first, then probes by subject)."""
    plan = [{"subject": s, "gallery": True, "media": GALLERY_MEDIA} for s in range(subjects)]
    for s in range(subjects):
        for _ in range(probes_per_subject):
            plan.append({"subject": s, "gallery": False, "media": PROBE_MEDIA[int(rng.integers(len(PROBE_MEDIA)))]})
    ids = rng.choice(np.arange(10, 100_000), len(plan), replace=False)
    for t, tid in zip(plan, ids, strict=True):
        t["id"] = int(tid)
    return plan


def _render_images(out: Path, plan: list[dict], seed: int, rng, progress: Progress | None) -> list[str]:
    """Write the loose crops; fills each template's ``images`` (name, media id); returns the 5-point lines."""
    from PIL import Image

    from facetool.pipeline.synth import render

    total = sum(sum(t["media"]) for t in plan)
    lines, frames_of = [], {}
    media_id = 3
    for t in plan:
        t["images"] = []
        for frames in t["media"]:
            media_id += int(rng.integers(1, 50))
            for _ in range(frames):
                k = frames_of[t["subject"]] = frames_of.get(t["subject"], -1) + 1
                face = np.asarray(Image.open(io.BytesIO(render(seed, t["subject"], k))).convert("RGB"))
                crop, points = loose_crop(face, rng)
                name = f"{len(lines) + 1}.jpg"
                write_bytes_atomic(out / IMAGE_FOLDER / name, encode_image(crop, "JPEG"))
                coords = " ".join(f"{v:.3f}" for v in points.ravel())
                lines.append(f"{name} {coords} {rng.uniform(0.6, 1.0):.3f}")
                t["images"].append((name, media_id))
                if progress is not None:
                    progress(len(lines), total)
    return lines


def _pair_lines(plan: list[dict], rng: np.random.Generator) -> list[str]:
    gallery = [t for t in plan if t["gallery"]]
    probes = [t for t in plan if not t["gallery"]]
    pairs = [f"{g['id']} {p['id']} {int(g['subject'] == p['subject'])}" for g in gallery for p in probes]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _one_to_n_lines(templates: list[dict]) -> list[str]:
    rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
    for t in templates:
        rows += [f"{t['id']},{1000 + 17 * t['subject']},img/{name}" for name, _ in t["images"]]
    return rows


def write_ijb_fixture(
    out: str | os.PathLike,
    *,
    subjects: int = 6,
    probes_per_subject: int = 2,
    seed: int = 0,
    target: str = "IJBC",
    one_to_n: bool = True,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write an IJB-layout folder (``meta/`` and ``loose_crop/``, see the module docstring) into ``out``; every
    file atomically. Returns the counts: subjects, images, templates, pairs, genuine."""
    if target not in TARGETS:
        raise FacetoolError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if subjects < 2 or probes_per_subject < 1:
        raise FacetoolError("an IJB fixture needs at least 2 subjects and 1 probe template per subject")
    out = Path(out)
    (out / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = _plan(subjects, probes_per_subject, rng)
    points = _render_images(out, plan, seed, rng, progress)
    tid_mid = [f"{name} {t['id']} {media}" for t in plan for name, media in t["images"]]
    pairs = _pair_lines(plan, rng)
    files = {"face_tid_mid.txt": tid_mid, "name_5pts_score.txt": points, "template_pair_label.txt": pairs}
    if one_to_n:
        half = subjects // 2
        g1, g2 = GALLERIES[target]
        gallery = [t for t in plan if t["gallery"]]
        files[f"1N_gallery_{g1}.csv"] = _one_to_n_lines(gallery[:half])
        files[f"1N_gallery_{g2}.csv"] = _one_to_n_lines(gallery[half:])
        files["1N_probe_mixed.csv"] = _one_to_n_lines([t for t in plan if not t["gallery"]])
    for suffix, lines in files.items():
        write_bytes_atomic(meta_file(out, target, suffix), "\n".join(lines) + "\n")
    genuine = sum(line.endswith(" 1") for line in pairs)
    return {"subjects": subjects, "images": len(points), "templates": len(plan), "pairs": len(pairs),
            "genuine": genuine}  # fmt: skip


__all__ = ["loose_crop", "write_ijb_fixture"]
