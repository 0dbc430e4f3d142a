"""fsutil's one-file writer (used by the bank's add_safety_features): all or nothing, flushed with its directory."""

from __future__ import annotations

import pytest

from vllm_safelora import fsutil


@pytest.fixture
def flushed(monkeypatch):
    """Paths fsync'ed (files) and directories fsync'ed, in order."""
    calls: list[tuple[str, str]] = []
    real_file, real_dir = fsutil.fsync_file, fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: (calls.append(("file", str(p))), real_file(p)))
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: (calls.append(("dir", str(p))), real_dir(p)))
    return calls


def test_atomic_file_replaces_and_flushes_file_then_directory(tmp_path, flushed):
    dest = tmp_path / "manifest.json"
    dest.write_text("old")
    with fsutil.atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest
        tmp.write_text("new")
        assert dest.read_text() == "old"  # nothing visible before the block ends
    assert dest.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert flushed == [("file", str(tmp)), ("dir", str(tmp_path))]


def test_atomic_file_failure_leaves_the_old_file_and_no_temp(tmp_path, flushed):
    dest = tmp_path / "manifest.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), fsutil.atomic_file(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert flushed == []


def test_atomic_directory_flushes_files_then_the_directory_then_its_parent(tmp_path, flushed):
    out = tmp_path / "adapter"
    with fsutil.atomic_directory(out) as tmp:
        (tmp / "a.json").write_text("{}")
    assert (out / "a.json").read_text() == "{}"
    assert flushed == [("file", str(tmp / "a.json")), ("dir", str(tmp)), ("dir", str(tmp_path))]
