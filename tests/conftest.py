"""Shared fixtures: small RecordIO datasets written with our writer (the MXNet-written ones live in fixtures/); and
the session's end check that no process the tests started is left running."""

from __future__ import annotations

import gc
import io
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import alive, descendants, wait_gone
from PIL import Image

from facetool.pipeline import recordio

FIXTURES = Path(__file__).parent / "fixtures"
MXNET_FIXTURES = FIXTURES / "mxnet"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def random_jpeg(rng: np.random.Generator, size: int = 112, quality: int = 90) -> bytes:
    """A small noisy JPEG (distinct bytes per call)."""
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_layout_a(out: Path, classes: int, per_class: int, seed: int = 0) -> list[tuple[int, int, bytes]]:
    """An InsightFace layout-A dataset of noise JPEGs (the library's writer); returns (key, label, jpeg)."""
    rng = np.random.default_rng(seed)
    images = [[random_jpeg(rng) for _ in range(per_class)] for _ in range(classes)]
    recordio.write_layout_a(out, images)
    return [(1 + c * per_class + k, c, img) for c, imgs in enumerate(images) for k, img in enumerate(imgs)]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> tuple[Path, list[tuple[int, int, bytes]]]:
    """A 24-class x 10-image layout-A dataset, shared (read-only) by the tests of a session."""
    out = tmp_path_factory.mktemp("small_dataset")
    return out, write_layout_a(out, 24, 10)


_SESSION: dict[str, str] = {}
# multiprocessing's own helper processes, which end with the interpreter that started them
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(scope="session", autouse=True)
def _session_temp(tmp_path_factory) -> Iterator[None]:
    """Remember the session's temporary folder: a process whose command line names it belongs to this session.
    The temporary files of the processes the tests start (DALI's generated code, multiprocessing's folders, which
    a killed process leaves behind) go into it too, through TMPDIR: pytest prunes it with the runs it keeps."""
    _SESSION["basetemp"] = str(tmp_path_factory.getbasetemp())
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    patch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    yield
    patch.undo()


def leftover_processes() -> dict[int, str]:
    """Processes this test session started that still run: below pytest, or naming the session's temporary
    folder on their command line (a killed run's workers were reparented)."""
    base, found = _SESSION.get("basetemp"), {}
    mine = set(descendants(os.getpid()))
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        helper = any(name in cmd for name in _INTERPRETER_HELPERS)
        if pid != os.getpid() and (pid in mine or (base and base in cmd)) and not helper and alive(pid):
            found[pid] = cmd
    return found


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``dali`` skip, saying why, where NVIDIA DALI (the optional ``dali`` extra) is not installed."""
    from facetool.train.data import DALI_INSTALL, dali_available

    if dali_available():
        return
    skip = pytest.mark.skip(reason=f"NVIDIA DALI is not installed here ({DALI_INSTALL})")
    for item in items:
        if item.get_closest_marker("dali"):
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run when a process it started still runs at its end (after a grace period for pools to close);
    kill those processes so that nothing is left behind."""
    if not Path("/proc/self/stat").exists():
        return  # no /proc: nothing to check with
    gc.collect()  # loaders kept alive only by reference cycles (a test's saved traceback) close their workers now
    left = leftover_processes()
    if left:
        wait_gone(list(left), within=15.0)
        left = {pid: cmd for pid, cmd in leftover_processes().items() if pid in left}
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
        print(f"\nERROR: {len(left)} processes started by the tests were still running at the end:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
