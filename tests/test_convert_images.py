"""facetool convert from your own faces: an image folder ROOT/<identity>/<image> or a list file of 'path label'
lines; every image's bytes in the shards exactly once with its identity's label, PNG kept PNG, resumable, and
hostile folders and lists refused with one line naming the file (and line)."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, kill_when, run_cli, tree_bytes
from PIL import Image
from shard_edit import read_samples

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.imagefolder import check_image, read_list
from facetool.pipeline.recordio import RecordIOError
from facetool.pipeline.shards import STATE_DIR, ConvertOptions, convert
from facetool.pipeline.shards.format import LABEL_EXT, LABEL_MAP, MANIFEST, MASK_EXT, PNG_EXT, read_manifest
from facetool.pipeline.synth import render

IDENTITIES = ("ada", "bo", "cy", "dee")  # folder names, sorted: their ranks are their labels
PER_IDENTITY = 6


def _png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
    return buf.getvalue()


def write_faces(root: Path) -> dict[str, tuple[bytes, str]]:
    """Synthetic faces as ``root/<identity>/<k>.jpg|png`` (every other one a PNG); relative path -> (bytes,
    identity)."""
    files = {}
    for i, ident in enumerate(IDENTITIES):
        (root / ident).mkdir(parents=True)
        for k in range(PER_IDENTITY):
            jpeg = render(7, i, k)
            rel = f"{ident}/{k}.png" if k % 2 else f"{ident}/{k}.jpg"
            data = _png(jpeg) if k % 2 else jpeg
            (root / rel).write_bytes(data)
            files[rel] = (data, ident)
    return files


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, dict[str, tuple[bytes, str]]]:
    root = tmp_path_factory.mktemp("faces") / "faces"
    return root, write_faces(root)


def shard_contents(out: Path) -> Counter:
    """(image bytes, extension, label) of every sample of a shard folder, counted."""
    got = Counter()
    for entry in read_manifest(out)["shards"]:
        for _, members in read_samples(out / entry["name"]):
            members = dict(members)
            ext = next(e for e in members if e in ("jpg", PNG_EXT))
            got[(members[ext], ext, int(np.frombuffer(members[LABEL_EXT], "<i4")[0]))] += 1
    return got


def expected(files: dict[str, tuple[bytes, str]], labels: dict[str, int]) -> Counter:
    return Counter((data, "png" if data.startswith(b"\x89PNG") else "jpg", labels[who]) for data, who in files.values())


@pytest.fixture(scope="module")
def converted(faces, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = faces
    out = tmp_path_factory.mktemp("folder-shards")
    return out, convert(root, out, ConvertOptions(samples_per_shard=7, workers=2, mask_fraction=0.5))


def test_a_folder_converts_every_image_once_with_its_identity_label(faces, converted):
    root, files = faces
    out, manifest = converted
    labels = {ident: i for i, ident in enumerate(IDENTITIES)}
    assert json.loads((out / LABEL_MAP).read_text()) == labels
    assert shard_contents(out) == expected(files, labels)  # bytes unchanged, PNG stays PNG, each exactly once
    assert manifest["source"] == {"path": str(root.resolve()), "layout": "folder", "records": 24, "classes": 4}
    assert manifest["arguments"]["image_size"] == 112 and manifest["skipped"] == 0
    assert 0 < manifest["masked"] < 24 and read_manifest(out) == manifest
    assert not (out / STATE_DIR).exists() and not list(out.glob("*.tmp"))


def test_png_samples_get_decodable_masked_twins(faces, converted):
    out, manifest = converted
    twins = [dict(m) for e in manifest["shards"] for _, m in read_samples(out / e["name"])]
    png_twins = [m[MASK_EXT] for m in twins if MASK_EXT in m and PNG_EXT in m]
    assert png_twins, "no PNG sample drew a twin; pick another seed"
    for twin in png_twins:
        assert Image.open(io.BytesIO(twin)).size == (112, 112)


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_both_loaders_read_png_and_jpeg_samples_with_their_labels(faces, converted, kind):
    from facetool.train.data import DaliLoader, LoaderConfig, WdsLoader, open_shards

    root, files = faces
    out, _ = converted
    decoded = {}
    for data, who in files.values():
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 127.5 - 1
        decoded.setdefault(IDENTITIES.index(who), []).append(pixels.transpose(2, 0, 1))
    config = LoaderConfig(batch_size=8, threads=1, shuffle_buffer=8, flip_prob=0.0)
    shards = open_shards(out)
    loader = DaliLoader(shards, config) if kind == "dali" else WdsLoader(shards, config, workers=0)
    seen = 0
    for batch in loader:
        for image, label in zip(batch.images, batch.labels, strict=True):
            diffs = [np.abs(image.float().numpy() - ref).max() for ref in decoded[int(label)]]
            assert min(diffs) <= 0.01  # this sample is one of its identity's images, pixel for pixel
            seen += 1
    assert seen == 24


def test_a_list_file_converts_with_its_labels_as_ranks(faces, tmp_path):
    root, files = faces
    given = {ident: g for ident, g in zip(IDENTITIES, (30, 10, 20, 10), strict=True)}  # sparse; two share 10
    body = [f"{rel}  {given[who]}" for rel, (_, who) in files.items()]
    body[2] = body[2].replace("/", "/./")  # the same file, spelled otherwise
    lists, out = tmp_path / "lists", tmp_path / "out"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(["# path label", "", *body, "../x.jpg 1"]) + "\n")
    line = error_line("convert", str(lists / "train.txt"), str(out), "--root", str(root), "--quiet")
    assert line.endswith("line 27: '../x.jpg' must be a relative path inside the folder (no '..', not absolute)")
    (lists / "train.txt").write_text("\n".join(["# path label", "", *body]) + "\n")  # paths relative to --root
    assert run_cli("convert", str(lists / "train.txt"), str(out), "--root", str(root), "--quiet").returncode == 0
    ranks = {"10": 0, "20": 1, "30": 2}
    assert json.loads((out / LABEL_MAP).read_text()) == ranks
    assert shard_contents(out) == expected(files, {who: ranks[str(g)] for who, g in given.items()})
    manifest = read_manifest(out)
    assert manifest["source"]["layout"] == "list" and manifest["source"]["classes"] == 3
    assert manifest["arguments"]["root"] == str(root.resolve())


def test_kill_minus_nine_then_resume_is_byte_identical(faces, tmp_path):
    root, _ = faces
    reference, out = tmp_path / "reference", tmp_path / "out"
    options = ConvertOptions(samples_per_shard=1, mask_fraction=1.0)  # a twin each: slow enough to be killed
    convert(root, reference, options)
    args = ["convert", str(root), str(out), "--samples-per-shard", "1", "--mask-fraction", "1", "--quiet"]
    kill_when(args, lambda: len(list(out.glob("*.tar"))) >= 3)
    assert 3 <= len(list(out.glob("*.tar"))) < 24 and not (out / MANIFEST).exists()
    assert run_cli(*args).returncode == 0
    assert tree_bytes(out) == tree_bytes(reference)


def test_a_changed_folder_is_another_plan(faces, tmp_path):
    root, _ = faces
    copy = tmp_path / "faces"
    copy.mkdir()
    for ident in IDENTITIES:
        os.symlink(root / ident, copy / ident)  # identity folders that lead out of the copy
    with pytest.raises(FacetoolError, match=r"lies outside .*symbolic link"):
        convert(copy, tmp_path / "x", ConvertOptions())
    for ident in IDENTITIES:
        (copy / ident).unlink()
    write_faces(copy)
    out = tmp_path / "out"
    convert(copy, out, ConvertOptions(samples_per_shard=5, part=(0, 2)))
    os.utime(copy / "ada" / "0.jpg", ns=(0, 0))  # the same bytes, touched: no longer the listing planned
    with pytest.raises(FacetoolError, match=r"of another conversion \(it differs in source contents\)"):
        convert(copy, out, ConvertOptions(samples_per_shard=5, part=(1, 2)))


def _damage_files(root: Path) -> list[str]:
    """Damage a copy of the faces in every way an image file can be bad; the relative names, in key order."""
    write_faces(root)
    (root / "ada" / "0.jpg").write_bytes((root / "ada" / "0.jpg").read_bytes()[:-300])  # truncated JPEG
    (root / "bo" / "1.png").write_bytes((root / "bo" / "1.png").read_bytes()[:-20])  # truncated PNG
    small = io.BytesIO()
    Image.new("RGB", (96, 112)).save(small, format="JPEG")
    (root / "cy" / "2.jpg").write_bytes(small.getvalue())  # another size
    (root / "cy" / "4.jpg").write_bytes(b"GIF89a not a face")  # neither JPEG nor PNG
    (root / "dee" / "notes.txt").write_text("not an image")
    (root / "eve").mkdir()  # an identity without images
    return ["ada/0.jpg", "bo/1.png", "cy/2.jpg", "cy/4.jpg", "dee/notes.txt", "eve/"]


def test_bad_image_files_fail_or_are_skipped_and_reported(tmp_path):
    root = tmp_path / "faces"
    bad = _damage_files(root)
    line = error_line("convert", str(root), str(tmp_path / "out"), "--quiet")
    assert line == f"Error: {root}/dee/notes.txt: not a .jpg, .jpeg or .png image file"
    (root / "dee" / "notes.txt").unlink()
    with pytest.raises(FacetoolError, match=rf"^{root}/eve: identity folder without images$"):
        convert(root, tmp_path / "out", ConvertOptions())
    (root / "eve").rmdir()
    first = r"(ada/0\.jpg: truncated|bo/1\.png: truncated|cy/2\.jpg: the image is 96x112|cy/4\.jpg: neither)"
    with pytest.raises(RecordIOError, match=rf"^{root}/{first}"):  # whichever the shuffle writes first
        convert(root, tmp_path / "out", ConvertOptions(samples_per_shard=30))
    _damage_files(tmp_path / "again")
    proc = run_cli("convert", str(tmp_path / "again"), str(tmp_path / "skipped"), "--on-error", "skip", "--quiet")
    assert proc.returncode == 0 and "convert: 20 samples" in proc.stdout and "6 skipped" in proc.stdout
    manifest = read_manifest(tmp_path / "skipped")
    assert sorted(s["error"].split(":")[0] for s in manifest["skipped_records"]) == sorted(
        str(tmp_path / "again" / b.rstrip("/")) for b in bad
    )
    assert manifest["samples"] == 20 and manifest["source"]["classes"] == 4  # eve got no label
    assert json.loads((tmp_path / "skipped" / LABEL_MAP).read_text()) == {k: i for i, k in enumerate(IDENTITIES)}


def test_image_checks_name_the_size_and_a_damaged_header():
    face = render(0, 0, 0)
    assert check_image(face, "f") == "jpg" and check_image(_png(face), "f") == "png"
    with pytest.raises(RecordIOError, match=r"^f: the image is 112x112, not 128x128 \(see --image-size\)$"):
        check_image(face, "f", 128)
    with pytest.raises(RecordIOError, match=r"^f: cannot read the image header"):
        check_image(face[:40], "f")


def _list(tmp_path: Path, text: bytes) -> Path:
    write_faces(tmp_path / "faces")
    (tmp_path / "faces" / "train.txt").write_bytes(text)
    return tmp_path / "faces" / "train.txt"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (b"ada/0.jpg 0\n../x.jpg 1\n", r"line 2: '\.\./x\.jpg' must be a relative path inside the folder"),
        (b"/etc/hostname 1\n", r"line 1: '/etc/hostname' must be a relative path inside the folder"),
        (b"ada/0.jpg 0\nada/9.jpg 1\n", r"line 2: .*/faces/ada/9\.jpg: not found$"),
        (b"ada/0.jpg 0\nbo/1.png x\n", r"line 2: label 'x' is not an integer in \[0, 2\^31\)$"),
        (b"ada/0.jpg -1\n", r"line 1: label '-1' is not an integer"),
        (b"ada/0.jpg\n", r"line 1: expected 'relative/path label', got 'ada/0\.jpg'$"),
        (b"# \xff\n\xff.jpg 0\n", r"line 1: not UTF-8 text \(invalid start byte at byte 2\)$"),
        (b"ada/0.jpg 0\n" + b"a" * 20000 + b" 1\n", r"line 2: longer than 16384 bytes$"),
        (b"ada/0.jpg 0\nbo/1.png 1\nada//0.jpg 2\n", r"line 3: 'ada/0\.jpg' is listed twice \(also on line 1\)$"),
        (b"\n# nothing\n", r"train\.txt: no images to convert$"),
        (b"escape.jpg 0\n", r"line 1: .*escape\.jpg: lies outside .*faces \(through a symbolic link\)$"),
    ],
    ids=["dotdot", "absolute", "missing", "label", "negative", "fields", "not-utf8", "huge-line", "twice", "empty",
         "symlink-out"],
)  # fmt: skip
def test_bad_list_files_are_one_line_errors_naming_the_line(tmp_path, text, pattern):
    path = _list(tmp_path, text)
    (tmp_path / "outside.jpg").write_bytes((tmp_path / "faces" / "ada" / "0.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", tmp_path / "faces" / "escape.jpg")
    with pytest.raises(FacetoolError) as err:
        read_list(path)
    assert "\n" not in str(err.value) and re.search(rf"^{re.escape(str(path))}", str(err.value))
    assert re.search(pattern, str(err.value)), str(err.value)


def test_a_missing_listed_file_is_skipped_and_reported(tmp_path):
    listing = read_list(_list(tmp_path, b"ada/0.jpg 4\nada/9.jpg 1\nbo/1.png 4\n"), on_error="skip")
    assert [listing.name(i) for i in range(len(listing))] == ["ada/0.jpg", "bo/1.png"]
    assert listing.identities == ["4"] and listing.labels.tolist() == [0, 0]
    assert [p.as_skipped()["file"] for p in listing.problems] == ["ada/9.jpg"]


@pytest.mark.parametrize(
    "case",
    ["non-utf8-name", "identity-symlink-out", "output-inside", "root-for-folder", "size-for-recordio", "neither"],
)
def test_bad_folders_and_arguments_are_one_line_errors(small_dataset, tmp_path, case):
    root, out, options = tmp_path / "faces", tmp_path / "out", ConvertOptions()
    write_faces(root)
    if case == "non-utf8-name":
        (root / "bo" / "1.png").rename(os.fsdecode(os.fsencode(root / "bo") + b"/\xff.png"))
        pattern = rf"{root}/bo/\\xff\.png: the name is not UTF-8 text; rename it"
    elif case == "identity-symlink-out":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "0.jpg").write_bytes((root / "ada" / "0.jpg").read_bytes())
        os.symlink(tmp_path / "elsewhere", root / "zed")  # an identity folder that leads out of the root
        pattern = rf"{root}/zed/0\.jpg: lies outside {root} \(through a symbolic link\)"
    elif case == "output-inside":
        out = root / "shards"
        pattern = rf"{out}: the output folder lies inside the image folder {root}; write it elsewhere"
    elif case == "root-for-folder":
        options = ConvertOptions(root=str(tmp_path))
        pattern = rf"{root}: --root applies to list files only \(an image folder is its own root\)"
    elif case == "neither":
        root = tmp_path / "neither"
        (root / "a").mkdir(parents=True)
        (root / "a" / "notes.txt").write_text("no faces here")
        pattern = rf"{root}: neither a RecordIO dataset folder \(with train\.rec\) nor an image folder .*"
    else:
        root, options = small_dataset[0], ConvertOptions(image_size=96)
        pattern = rf"{root}: --image-size and --root apply to image folders and list files only"
    with pytest.raises(FacetoolError) as err:
        convert(root, out, options)
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
