"""Processes: workers end with their killed parent (convert and synth pools), and one output folder takes one
command at a time (the folder's lock, taken over from a dead holder)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import write_layout_a
from helpers import FACETOOL, alive, descendants, error_line, kill_when, run_cli, wait_gone

from facetool.pipeline.lock import LOCK_NAME
from facetool.pipeline.shards import ConvertOptions, convert, read_manifest


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


GRANDCHILD = (
    "import sys, time\n"
    "sys.platform = 'darwin'  # no parent-death signal: the parent-liveness check has to do it\n"
    "from facetool.pipeline.processes import die_with_parent\n"
    "die_with_parent(int(sys.argv[1]))\n"
    "time.sleep(600)\n"
)
CHILD = (
    "import os, subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())])\n"
    "print(worker.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def test_where_there_is_no_parent_death_signal_a_worker_notices_its_parent_is_gone():
    parent = subprocess.Popen([sys.executable, "-c", CHILD, GRANDCHILD], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    time.sleep(0.5)  # let the worker start its check
    assert alive(worker)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    assert not wait_gone([worker], within=20)


def test_killed_training_leaves_no_loader_worker(small_dataset, tmp_path):
    from test_train import ENV, write_config

    convert(small_dataset[0], tmp_path / "shards", ConvertOptions(samples_per_shard=60))
    config = write_config(tmp_path / "c.toml", tmp_path, run={"steps": 400},
                          data={"workers": 2, "masked_prob": 0.0})  # fmt: skip
    scalars = tmp_path / "run" / "logs" / "scalars.jsonl"
    workers = kill_when(
        ["train", str(config), "--output", str(tmp_path / "run"), "--quiet"],
        lambda: scalars.is_file() and scalars.stat().st_size > 0,
        env=ENV,
    )
    assert len(workers) >= 2  # the DataLoader's; kill_when checked that they ended with the run
