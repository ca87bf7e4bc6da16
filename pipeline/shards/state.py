"""The state folder of a conversion (``OUT/.facetool-convert/``): the plan being carried out, and each finished
shard's stats until the manifest is written.

Nothing in an output folder is reused unless it is proven to belong to this plan (``ConvertJob.plan_id``: the
source's contents, the arguments, the part count): every part's plan file, every manifest already there and every
finished shard's stats are checked before any work starts, and anything else is refused with one line naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import MANIFEST, ShardStats, load_manifest, publish, shard_name
from facetool.pipeline.shards.plan import STATE_DIR, ConvertJob

_READABLE = {"parts": "part count", "source": "source path", "records": "record count", "classes": "classes"}
_CONTENTS = ("source_bytes", "source_mtime_ns", "index_sha256")


def finished_manifest(job: ConvertJob) -> dict | None:
    """The manifest of this conversion when it is already complete in ``job.out`` (None when it is not); a
    complete conversion of another plan is an error."""
    path = job.manifest_path
    if not path.is_file() or job.plan_path.is_file():
        return None
    manifest = load_manifest(path)
    differences = manifest_differences(manifest, job)
    if differences:
        raise FacetoolError(
            f"{path}: this folder holds a conversion with other arguments or source (it differs in {differences})"
        )
    return manifest


def manifest_differences(manifest: dict, job: ConvertJob) -> str:
    """How a (checked) manifest differs from ``job``'s plan ("" when it is this plan's): by the part's plan id
    when it has one, else by what a manifest records (source path, records, arguments, part count)."""
    plan = manifest["part"].get("plan")
    if plan is not None and plan == job.plan_id:
        return ""
    mine = job.record()
    names = _argument_differences(manifest["arguments"], mine["arguments"])
    if manifest["source"]["path"] != mine["source"]:
        names.append("source path")
    if manifest["source"]["records"] != mine["records"]:
        names.append("record count")
    if manifest["part"]["count"] != mine["parts"]:
        names.append("part count")
    if plan is not None and not names:
        names.append("source contents")
    return ", ".join(names)


def _argument_differences(old: object, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["arguments"]
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def plan_differences(old: object, job: ConvertJob) -> str:
    """How a plan file's record differs from ``job``'s ("" when it is the same plan, whatever the part)."""
    if isinstance(old, dict) and old.get("plan") == job.plan_id:
        return ""
    if not isinstance(old, dict):
        return "everything (it is not a plan)"
    mine = job.record()
    names = _argument_differences(old.get("arguments"), mine["arguments"])
    names += [_READABLE[k] for k in _READABLE if old.get(k) != mine[k]]
    if any(old.get(k) != mine[k] for k in _CONTENTS):
        names.append("source contents")
    return ", ".join(names) or "plan"


def check_output_dir(out: Path) -> None:
    """Create the output folder, or fail with one line when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".facetool-write-test-{os.getpid()}"
        probe.write_bytes(b"")  # a probe, removed at once: not a file facetool publishes
        probe.unlink()
    except OSError as err:
        raise FacetoolError(f"{out}: output folder is not writable ({err.strerror})") from None


def read_json(path: Path) -> object:
    """A state file's JSON; a file that cannot be read or parsed is one line naming it."""
    try:
        return json.loads(path.read_bytes())
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror})") from None
    except (ValueError, RecursionError):
        raise FacetoolError(
            f"{path}: damaged (not valid JSON); delete {path.parent} to start this conversion over"
        ) from None


def claim_plan(job: ConvertJob) -> dict[int, ShardStats]:
    """Check that everything already in the output folder belongs to this plan (every part's plan file, every
    manifest, every finished shard of this part), record the plan, and return the finished shards' stats. Called
    under the folder's lock, as ``clear_state`` is (it removes the state folder when it is empty)."""
    try:
        (job.out / STATE_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise FacetoolError(f"{job.out}: output folder is not writable ({err.strerror})") from None
    for path in sorted((job.out / STATE_DIR).glob("plan.*.json")):
        differences = plan_differences(read_json(path), job)
        if differences:
            raise FacetoolError(
                f"{job.out}: holds an unfinished conversion ({STATE_DIR}/{path.name}) that differs in "
                f"{differences}; re-run it with the same arguments or use another output folder"
            )
    for path in sorted([*job.out.glob("manifest.part-*-of-*.json"), job.out / MANIFEST]):
        if path.is_file():
            differences = manifest_differences(load_manifest(path), job)
            if differences:
                raise FacetoolError(
                    f"{job.out}: holds {path.name} of another conversion (it differs in {differences}); use "
                    "another output folder"
                )
    done = {s: load_stats(job, s) for s in job.mine if job.is_written(s)}
    if not job.plan_path.is_file():
        pi, pn = job.options.part
        publish(job.plan_path, json.dumps({**job.record(), "part": [pi, pn], "plan": job.plan_id}, indent=1))
    return done


def save_stats(job: ConvertJob, shard: int, stats: ShardStats) -> None:
    """Record a finished shard's stats in the state folder (before its tar gets its final name)."""
    publish(job.stats_path(shard), json.dumps(asdict(stats)))


def load_stats(job: ConvertJob, shard: int) -> ShardStats:
    """The stats a finished shard recorded, checked to be this plan's and to match the tar; else an error naming
    the shard."""
    path, tar = job.stats_path(shard), job.out / f"{shard_name(shard)}.tar"
    try:
        stats = ShardStats(**json.loads(path.read_bytes()))
        if not _well_formed(stats):
            raise TypeError
    except (OSError, ValueError, TypeError, RecursionError):
        raise FacetoolError(
            f"{tar}: exists but its record {path} is missing or damaged; delete the shard and re-run"
        ) from None
    if stats.plan != job.plan_id:
        raise FacetoolError(
            f"{tar}: written by another conversion (its record {path.name} names another plan); delete it or use "
            "another output folder"
        )
    if tar.stat().st_size != stats.bytes:
        raise FacetoolError(
            f"{tar}: has {tar.stat().st_size} bytes, its record says {stats.bytes}; delete it and re-run"
        )
    return stats


def _well_formed(stats: ShardStats) -> bool:
    counts = (stats.samples, stats.masked, stats.bytes, stats.max_label)
    texts = (stats.name, stats.index, stats.sha256, stats.plan)
    return (
        all(isinstance(v, int) and not isinstance(v, bool) for v in counts)
        and all(isinstance(v, str) for v in texts)
        and isinstance(stats.skipped, list)
        and all(isinstance(v, dict) for v in stats.skipped)
    )


def clear_state(job: ConvertJob) -> None:
    """Remove this part's state once its manifest is written (and the state folder, when no part is left)."""
    for s in job.mine:
        job.stats_path(s).unlink(missing_ok=True)
    job.plan_path.unlink(missing_ok=True)
    try:
        (job.out / STATE_DIR).rmdir()
    except OSError:
        pass  # other parts still at work
