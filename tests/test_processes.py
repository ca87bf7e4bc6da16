"""Processes: workers end with their killed parent (convert and synth pools), and one output folder takes one
command at a time (the folder's lock, taken over from a dead holder)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import write_layout_a
from helpers import FACETOOL, descendants, error_line, kill_when, run_cli, wait_gone

from facetool.pipeline.lock import LOCK_NAME
from facetool.pipeline.shards import read_manifest


def test_killed_synth_leaves_no_worker(tmp_path):
    out = tmp_path / "synth"
    partial = out / "train.rec.tmp"
    workers = kill_when(
        ["synth", str(out), "--identities", "100", "--images-per-identity", "40", "--workers", "2", "--quiet"],
        lambda: partial.is_file() and partial.stat().st_size > 0,
    )
    assert len(workers) >= 2  # kill_when checked that they ended by themselves


RUN_LOCK = f"{LOCK_NAME}.part-0000-of-0001"  # what a (one-part) convert holds while it writes


def _wait_for_lock(out: Path, proc: subprocess.Popen) -> None:
    lock = out / RUN_LOCK
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith(f"{proc.pid} ") and len(descendants(proc.pid)) >= 2):
        assert proc.poll() is None, "the first convert ended before it took the lock and started its workers"
        assert time.monotonic() < deadline, "the first convert never took the lock and started its workers"
        time.sleep(0.01)


def test_a_second_convert_into_a_folder_in_use_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_layout_a(src, 30, 20, seed=4)
    args = ["convert", str(src), str(out), "--samples-per-shard", "5", "--workers", "2", "--quiet"]
    first = subprocess.Popen([*FACETOOL, *args], start_new_session=True)
    try:
        _wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # frozen while it holds the lock: the refusal below is certain
        workers = descendants(first.pid)
        for command in (args, ["merge-parts", str(out)]):
            line = error_line(*command)
            assert line == (
                f"Error: {out}: in use by another facetool command (pid {first.pid} on host {socket.gethostname()}, "
                "facetool convert); wait for it to end or use another folder"
            )
    finally:
        first.kill()
        first.wait()
    assert (out / RUN_LOCK).is_file()  # left behind by the killed holder ...
    assert run_cli(*args).returncode == 0  # ... and taken over
    assert not list(out.glob(f"{LOCK_NAME}*")) and read_manifest(out)["samples"] == 600
    assert workers and not wait_gone(workers)  # the frozen-then-killed holder's workers ended with it


def test_the_parts_of_a_cluster_conversion_write_into_one_folder_at_once(small_dataset, tmp_path):
    src, out = small_dataset[0], tmp_path / "out"
    jobs = [
        subprocess.Popen([*FACETOOL, "convert", str(src), str(out), "--samples-per-shard", "10", "--part",
                          f"{i}/3", "--quiet"], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]  # fmt: skip
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0 and "Traceback" not in err, err
    assert run_cli("merge-parts", str(out)).returncode == 0
    assert read_manifest(out)["samples"] == 240 and not list(out.glob(f"{LOCK_NAME}*"))
