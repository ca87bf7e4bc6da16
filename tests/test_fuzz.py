"""Seeded fuzzing of every file facetool reads: byte flips and truncations of a `.rec`, its `.idx`, a shard tar, its
index and the manifest. Each case must give a correct result or a one-line FacetoolError: never another exception,
a hang, or silent loss (a record neither read correctly nor reported).

RecordIO and tar members carry no checksum of their data, so a flipped byte inside an image or a label is data:
"correct" means the bytes stored at that record's (or member's) own place, read from there and nowhere else. A
flipped byte in the structure (a frame's magic or length, an index entry, a tar header, the manifest) must be
reported. Most cases run in-process through the library; a handful through the command line.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_layout_a
from helpers import run_cli

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import LENGTH_MASK, RecordFile, unpack_payload
from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.shards.format import MANIFEST, read_index, read_manifest
from facetool.train.data import LoaderConfig, WdsLoader, open_shards
from facetool.train.data.fallback import read_samples

SEED = 14
CASE_SECONDS = 20  # a case that runs longer hangs


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail a case that does not finish in time (SIGALRM: the main thread of a POSIX process)."""

    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reported(err: FacetoolError) -> None:
    """A reported problem is one line."""
    assert "\n" not in str(err) and str(err).strip(), repr(str(err))


@dataclass
class Damage:
    """One fuzz case: which file, and a flip (position, xor mask) or a truncation (new length)."""

    name: str
    flip: tuple[int, int] | None = None
    cut: int | None = None

    def apply(self, data: bytes) -> bytes:
        if self.cut is not None:
            return data[: self.cut]
        pos, mask = self.flip
        out = bytearray(data)
        out[pos] ^= mask
        return bytes(out)


def cases(rng: random.Random, name: str, size: int, flips: int, cuts: int, hot: list[int] = ()) -> list[Damage]:
    """``flips`` random byte flips (half of them on the ``hot`` structural positions, when given) and ``cuts``
    truncations of a file of ``size`` bytes."""
    out = []
    for i in range(flips):
        pos = rng.choice(hot) if hot and i % 2 else rng.randrange(size)
        out.append(Damage(name, flip=(pos, 1 << rng.randrange(8))))
    return out + [Damage(name, cut=rng.randrange(size)) for _ in range(cuts)]


# -- RecordIO --------------------------------------------------------------------------------------------------------
@dataclass
class Original:
    """A record of the pristine file: where its frames' headers and its payload's bytes lie."""

    key: int
    headers: list[int]  # byte positions of its frames' magic and length words
    payload: list[int]  # the file position of each payload byte (a split record's parts, the magic re-inserted)
    end: int  # the end of its last frame, padding included


def walk(data: bytes, offset: int) -> tuple[list[int], list[int], int]:
    """(frame header bytes, payload byte positions, end) of the record at ``offset`` (MXNet's split records
    re-insert the magic between parts: those bytes come from the next frame's header)."""
    headers, payload, pos = [], [], offset
    while True:
        (lrecord,) = struct.unpack_from("<I", data, pos + 4)
        flag, length = lrecord >> 29, lrecord & LENGTH_MASK
        if flag in (2, 3):
            payload += range(pos, pos + 4)  # the magic that the reader puts back
        headers += range(pos, pos + 8)
        payload += range(pos + 8, pos + 8 + length)
        pos += 8 + ((length + 3) & ~3)
        if flag in (0, 3):
            return headers, payload, pos


@pytest.fixture(scope="module")
def recordio(tmp_path_factory) -> tuple[Path, dict[int, Original], bytes, bytes]:
    root = tmp_path_factory.mktemp("fuzz_rec")
    write_layout_a(root, 6, 6, seed=SEED)  # images 1..36, identity records 37..42, header 0
    rec, idx = (root / "train.rec").read_bytes(), (root / "train.idx").read_bytes()
    originals = {}
    for line in idx.decode().splitlines():
        key, offset = (int(v) for v in line.split())
        originals[key] = Original(key, *walk(rec, offset))
    return root, originals, rec, idx


def expected_payload(data: bytes, original: Original, damage: Damage | None) -> bytes | None:
    """What reading ``original`` from the (damaged) ``.rec`` must give: its payload as stored there, or None when
    the damage touches its structure (or cuts it), so that it must be reported."""
    if damage is None:
        return bytes(data[p] for p in original.payload)
    if damage.cut is not None:
        return None if original.end > damage.cut else bytes(data[p] for p in original.payload)
    if damage.flip[0] in original.headers:
        return None
    return bytes(data[p] for p in original.payload)


def check_records(folder: Path, originals: dict[int, Original], damage: Damage, rec: bytes, skip: bool) -> None:
    """The oracle: every image record of the pristine file is read as stored, or reported. (An index cut just
    after a line end is a valid shorter index, as one that leaves records out on purpose: only the records it
    still lists are expected.)"""
    rec_damage = damage if damage.name == "train.rec" else None
    index = (folder / "train.idx").read_bytes()
    if damage.name == "train.idx" and damage.cut is not None and index.endswith(b"\n"):
        listed_lines = {int(line.split()[0]) for line in index.decode().splitlines()}
        originals = {k: o for k, o in originals.items() if k in listed_lines}
    try:
        rf = RecordFile(folder / "train.rec", folder / "train.idx", on_index_error="skip" if skip else "fail")
    except FacetoolError as err:
        return reported(err)
    with rf:
        listed = {p.key for p in rf.index_problems}
        keys = {int(k): i for i, k in enumerate(rf.keys.tolist())}
        for key, original in originals.items():
            if not 1 <= key <= 36:
                continue  # the header and identity records are no images
            if key not in keys:
                assert key in listed, f"{damage}: record {key} was neither read nor reported"
                continue
            want = expected_payload(rec, original, rec_damage)
            try:
                record = rf[keys[key]]
            except FacetoolError as err:
                reported(err)
                continue
            assert want is not None, f"{damage}: record {key} read although its structure was damaged"
            try:
                _, labels, image = unpack_payload(want)
            except ValueError:
                raise AssertionError(f"{damage}: record {key} read although its payload is malformed") from None
            assert record.image == image and record.label.tobytes() == labels.tobytes(), f"{damage}: record {key}"


def test_recordio_fuzz(recordio, tmp_path):
    root, originals, rec, idx = recordio
    rng = random.Random(SEED)
    hot = sorted({p for o in originals.values() for p in [*o.headers, *o.payload[:32]]})  # frames and IRHeaders
    todo = cases(rng, "train.rec", len(rec), 110, 15, hot) + cases(rng, "train.idx", len(idx), 80, 15)
    for n, damage in enumerate(todo):
        folder = tmp_path / f"case-{n % 4}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        files = {"train.rec": rec, "train.idx": idx}
        files[damage.name] = damage.apply(files[damage.name])
        for name, data in files.items():
            (folder / name).write_bytes(data)
        with deadline(CASE_SECONDS):
            check_records(folder, originals, damage, files["train.rec"], skip=n % 2 == 1)
    assert len(todo) == 220


# -- shards ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(recordio, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz_shards") / "shards"
    convert(recordio[0], out, ConvertOptions(samples_per_shard=14, seed=SEED))
    return out


def check_shards(folder: Path, pristine: Path) -> None:
    """The oracle: the start-up checks and every sample, read through the fallback, are right or reported."""
    try:
        read_manifest(folder)  # what `inspect` shows
        shard_set = open_shards(folder)
    except FacetoolError as err:
        return reported(err)
    seen = []
    try:
        for shard in shard_set.shards:
            members = read_index(pristine / shard.index.name)  # where each member lies in the pristine tar
            data = shard.tar.read_bytes()
            samples = read_samples(str(shard.tar), str(shard.index), 0, shard.samples)
            for sample, expected in zip(samples, members, strict=True):
                assert sample["__key__"] == expected[0].key
                for m in expected:
                    assert sample[m.ext] == data[m.offset : m.offset + m.size], f"{shard.tar.name} {m.name}"
                seen.append(sample["__key__"])
        config = LoaderConfig(batch_size=8, shuffle_buffer=8)
        for _ in WdsLoader(shard_set, config, workers=0):  # decoding and the label check too
            pass
    except FacetoolError as err:
        return reported(err)
    assert sorted(seen) == sorted(f"{k:09d}" for k in range(1, 37)), "a sample read twice or not at all"


def test_shard_fuzz(shards, tmp_path):
    rng = random.Random(SEED + 1)
    tar = (shards / "shard-000001.tar").read_bytes()
    index = (shards / "shard-000001.idx").read_bytes()
    manifest = (shards / MANIFEST).read_bytes()
    headers = [m.header_offset + i for s in read_index(shards / "shard-000001.idx") for m in s for i in range(512)]
    todo = (
        cases(rng, "shard-000001.tar", len(tar), 40, 6, headers)
        + cases(rng, "shard-000001.idx", len(index), 30, 4)
        + cases(rng, MANIFEST, len(manifest), 30, 4)
    )
    for n, damage in enumerate(todo):
        folder = tmp_path / f"case-{n % 4}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(shards, folder)
        path = folder / damage.name
        path.write_bytes(damage.apply(path.read_bytes()))
        with deadline(CASE_SECONDS):
            check_shards(folder, shards)
    assert len(todo) == 114


# -- the command line: a handful of cases end to end ----------------------------------------------------------------
def _damaged_copy(src: Path, dst: Path, name: str, edit: Callable[[bytes], bytes]) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_bytes(edit((dst / name).read_bytes()))
    return dst


def test_fuzz_cases_on_the_command_line(recordio, shards, tmp_path):
    root, originals, rec, idx = recordio
    header = originals[7].headers[4]  # record 7's length word
    flip = lambda pos: lambda b: b[:pos] + bytes([b[pos] ^ 0x10]) + b[pos + 1 :]  # noqa: E731
    length = _damaged_copy(root, tmp_path / "a", "train.rec", flip(header))
    cut_idx = _damaged_copy(root, tmp_path / "b", "train.idx", lambda b: b[:-9])
    cut_rec = _damaged_copy(root, tmp_path / "c", "train.rec", lambda b: b[: len(b) // 3])
    samples = _damaged_copy(
        shards, tmp_path / "d", MANIFEST, lambda b: b.replace(b'"samples": 14', b'"samples": 1e9', 1)
    )
    out = str(tmp_path / "o")
    runs = [
        ["inspect", str(length)],
        ["convert", str(cut_idx), out],
        ["convert", str(cut_rec), out],
        ["inspect", str(samples)],
    ]
    for args in runs:
        proc = run_cli(*args, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {args[1]}/"), proc.stderr
    proc = run_cli("convert", str(length), str(tmp_path / "skip"), "--on-error", "skip", "--quiet", timeout=120)
    assert proc.returncode == 0 and "skipped: " in proc.stderr and "record 8 at byte offset" in proc.stderr
    assert "starts inside record 7 (line 7" in proc.stderr  # record 7 now reaches into record 8: both are out
    assert [s["key"] for s in read_manifest(tmp_path / "skip")["skipped_records"]] == [7, 8]


def test_a_cut_index_line_is_reported_not_read_as_a_shorter_offset(tmp_path):
    write_layout_a(tmp_path, 2, 3, seed=SEED)
    lines = (tmp_path / "train.idx").read_text().splitlines()
    key, offset = lines[2].split("\t")
    lines[2] = f"{key}\t{offset[:-1]}"  # the offset loses its last digit
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(FacetoolError) as err:
        RecordFile(tmp_path / "train.rec", tmp_path / "train.idx")
    reported(err.value)
    assert "train.idx: line 3: record 3 " in str(err.value)
