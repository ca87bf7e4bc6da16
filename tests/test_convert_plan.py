"""Nothing in an output folder is reused unless it belongs to the same plan (source contents, arguments, seed, part
count): interrupted runs, part manifests and shard stats of another plan are refused with one line, and so are
damaged state files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_layout_a
from helpers import error_line, run_cli

from facetool.pipeline.shards import STATE_DIR, ConvertOptions, convert
from facetool.pipeline.shards.format import MANIFEST, read_manifest

SPS = "20"  # samples per shard: 240 records -> 12 shards


class _Stop(Exception):
    pass


def interrupted(src: Path, out: Path, shards: int, **options) -> None:
    """A conversion stopped (as by kill -9) once ``shards`` shards are written: its state folder stays."""

    def progress(done: int, total: int) -> None:
        if len(list(out.glob("shard-*.tar"))) >= shards:
            raise _Stop

    with pytest.raises(_Stop):
        convert(src, out, ConvertOptions(samples_per_shard=int(SPS), **options), progress=progress)
    assert (out / STATE_DIR).is_dir() and not (out / MANIFEST).exists()


def _convert(src: Path, out: Path, *args: str) -> str:
    return error_line("convert", str(src), str(out), "--samples-per-shard", SPS, "--quiet", *args)


def test_parts_with_another_seed_refuse_a_folder_an_interrupted_run_left(small_dataset, tmp_path):
    src, _ = small_dataset
    out = tmp_path / "out"
    interrupted(src, out, 3)
    for part in ("0/2", "1/2"):
        line = _convert(src, out, "--part", part, "--seed", "5")
        assert str(out) in line and "unfinished conversion" in line and "differs in seed, part count;" in line
    line = _convert(src, out, "--part", "0/2")  # the same seed, but not the same split into parts
    assert "differs in part count;" in line
    assert run_cli("convert", str(src), str(out), "--samples-per-shard", SPS, "--quiet").returncode == 0
    assert read_manifest(out)["samples"] == 240


def test_a_part_refuses_a_folder_holding_another_plans_part(small_dataset, tmp_path):
    """Part 0 from one version of a dataset, part 1 from another at the same path: refused, not merged."""
    src = tmp_path / "src"
    shutil.copytree(small_dataset[0], src)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(samples_per_shard=int(SPS), part=(0, 2)))
    write_layout_a(src, 24, 10, seed=9)  # the same path and record count, other images
    line = _convert(src, out, "--part", "1/2")
    assert "manifest.part-0000-of-0002.json of another conversion" in line and "source contents" in line


def test_merge_refuses_parts_of_two_plans(small_dataset, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_dataset[0], src)
    a, b = tmp_path / "a", tmp_path / "b"
    convert(src, a, ConvertOptions(samples_per_shard=int(SPS), part=(0, 2)))
    write_layout_a(src, 24, 10, seed=9)
    convert(src, b, ConvertOptions(samples_per_shard=int(SPS), part=(1, 2)))
    for f in b.iterdir():
        shutil.copy(f, a / f.name)
    line = error_line("merge-parts", str(a))
    assert "manifest.part-0001-of-0002.json: not a part of the same conversion" in line and "part.plan" in line
    assert not (a / MANIFEST).exists()


def test_a_shard_of_another_plan_is_not_reused_on_resume(small_dataset, tmp_path):
    src, _ = small_dataset
    mine, other = tmp_path / "mine", tmp_path / "other"
    interrupted(src, mine, 2)
    interrupted(src, other, 4, seed=5)
    for name in ("shard-000003.tar", "shard-000003.idx", f"{STATE_DIR}/shard-000003.json"):
        shutil.copy(other / name, mine / name)
    line = _convert(src, mine)
    assert "shard-000003.tar: written by another conversion" in line


def test_a_finished_shard_without_its_stats_is_refused_before_any_work(small_dataset, tmp_path):
    src, _ = small_dataset
    out = tmp_path / "out"
    interrupted(src, out, 3)
    (out / STATE_DIR / "shard-000001.json").unlink()
    before = sorted(p.name for p in out.iterdir())
    line = _convert(src, out)
    assert "shard-000001.tar: exists but its record" in line
    assert sorted(p.name for p in out.iterdir()) == before  # refused before writing anything


def _damage_plan(out: Path) -> Path:
    path = out / STATE_DIR / "plan.part-0000-of-0001.json"
    path.write_text('{"source": ')
    return path


def _damage_stats(out: Path) -> Path:
    path = out / STATE_DIR / "shard-000001.json"
    stats = json.loads(path.read_text())
    path.write_text(json.dumps({**stats, "samples": "abc"}))
    return out / "shard-000001.tar"  # the error names the shard (and its record)


def _damage_part_manifest(out: Path) -> Path:
    path = out / "manifest.part-0001-of-0002.json"
    path.write_bytes(path.read_bytes()[:50])
    return path


def _damage_manifest(out: Path) -> Path:
    (out / MANIFEST).write_text("{not json")
    return out / MANIFEST


@pytest.mark.parametrize(
    "damage, command",
    [
        (_damage_plan, "convert"),
        (_damage_stats, "convert"),
        (_damage_part_manifest, "merge-parts"),
        (_damage_manifest, "convert"),
    ],
    ids=["plan", "shard-stats", "part-manifest", "manifest"],
)
def test_damaged_state_files_are_one_line_errors_naming_them(small_dataset, tmp_path, damage, command):
    src, _ = small_dataset
    out = tmp_path / "out"
    if damage in (_damage_plan, _damage_stats):
        interrupted(src, out, 2)
    elif damage is _damage_part_manifest:
        for i in range(2):
            convert(src, out, ConvertOptions(samples_per_shard=int(SPS), part=(i, 2)))
    else:
        convert(src, out, ConvertOptions(samples_per_shard=int(SPS)))
    path = damage(out)
    line = _convert(src, out) if command == "convert" else error_line("merge-parts", str(out))
    assert str(path) in line and ("JSON" in line or "damaged" in line)


def test_part_manifests_name_their_plan_and_the_merged_manifest_does_not(small_dataset, tmp_path):
    src, _ = small_dataset
    out = tmp_path / "out"
    for i in range(2):
        convert(src, out, ConvertOptions(samples_per_shard=int(SPS), part=(i, 2)))
    plans = {json.loads(p.read_text())["part"]["plan"] for p in out.glob("manifest.part-*.json")}
    assert len(plans) == 1 and all(plans)
    assert run_cli("merge-parts", str(out)).returncode == 0
    assert read_manifest(out)["part"] == {"index": 0, "count": 1, "total_shards": 12}
