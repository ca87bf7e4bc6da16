"""The one atomic-write helper: all or nothing, no temporary file left behind, errors that name the file."""

from __future__ import annotations

import errno
import json
import os

import pytest

from facetool.pipeline.atomic import atomic_open, write_bytes_atomic, write_json_atomic
from facetool.pipeline.errors import FacetoolError


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1} and path.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failing_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed half-way")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "shard.tar"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(FacetoolError, match=rf"^{path}: cannot write: No space left on device$"):
        write_bytes_atomic(path, b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_names_the_file(tmp_path):
    path = tmp_path / "missing" / "x.json"
    with pytest.raises(FacetoolError, match=rf"^{path}: cannot write: No such file or directory$"):
        write_json_atomic(path, {})


def test_published_files_get_the_usual_permissions(tmp_path):
    """Not owner-only as a mkstemp file would be: datasets are shared between users."""
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "property", "2,112,112\n")
    finally:
        os.umask(old)
    assert (tmp_path / "property").stat().st_mode & 0o777 == 0o644
