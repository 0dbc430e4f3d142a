"""The worker guard: only intact entries of the cache reach vLLM's loader, and an altered one
is removed through the cache's own layout (so a crash mid-removal is cleaned up at start-up)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from vllm_safelora.cache import CacheKey, CorruptEntry, PatchedAdapterCache
from vllm_safelora.cache.worker_guard import EntryRefused, WorkerGuard

WEIGHTS = "adapter_model.safetensors"


def _entry(root: Path, payload: bytes = b"patched weights") -> Path:
    def build(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (tmp / WEIGHTS).write_bytes(payload)

    cache = PatchedAdapterCache(root, 10**9)
    entry, _ = cache.get_or_create(CacheKey(hashlib.sha256(payload).hexdigest(), "bank", "policy"), build)
    return entry.path


def _rewrite_in_place(path: Path, data: bytes) -> None:
    st = os.stat(path)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_intact_entry_is_read_once_as_the_verified_bytes(tmp_path):
    entry = _entry(tmp_path)
    seen = []
    got, result = WorkerGuard(tmp_path).load(str(entry), lambda path, data: seen.append((path, bytes(data))) or "lora")
    assert (got, result) == (entry, "lora")
    assert seen == [(entry / WEIGHTS, b"patched weights")]


@pytest.mark.parametrize("path", [None, "", "relative/entry", "/elsewhere/adapter"])
def test_a_path_outside_the_cache_is_refused_and_nothing_removed(tmp_path, path):
    entry = _entry(tmp_path)
    with pytest.raises(EntryRefused) as refused:
        WorkerGuard(tmp_path).load(path, lambda *_: pytest.fail("vLLM's loader must not run"))
    assert not refused.value.removed and "never projected" in refused.value.problem
    assert entry.is_dir()


def test_an_entry_altered_in_place_is_refused_and_removed(tmp_path):
    entry = _entry(tmp_path)
    _rewrite_in_place(entry / WEIGHTS, b"PATCHED weights")  # same size, same mtime
    with pytest.raises(EntryRefused) as refused:
        WorkerGuard(tmp_path).load(str(entry), lambda *_: pytest.fail("vLLM's loader must not run"))
    assert refused.value.removed and "failed verification" in refused.value.problem
    assert not entry.exists() and os.listdir(tmp_path / "tmp") == []


def test_files_changed_while_vllm_read_them_are_refused(tmp_path):
    entry = _entry(tmp_path)

    def read(path, data):
        (entry / "adapter_config.json").chmod(0o644)
        (entry / "adapter_config.json").write_text(json.dumps({"r": 8}))
        return "lora"

    with pytest.raises(EntryRefused) as refused:
        WorkerGuard(tmp_path).load(str(entry), read)
    assert refused.value.removed and "changed while vLLM read them" in refused.value.problem
    assert not entry.exists()


def test_a_loader_that_bypassed_the_verified_bytes_counts_as_altered(tmp_path):
    entry = _entry(tmp_path)

    def read(path, data):
        raise CorruptEntry("vLLM did not read the weights through the verified read")

    with pytest.raises(EntryRefused) as refused:
        WorkerGuard(tmp_path).load(str(entry), read)
    assert refused.value.removed and not entry.exists()


def _discard_then_die(root: str, entry: str) -> None:
    from vllm_safelora.cache import worker_guard

    def rename_only(path, trash):  # the process dies after moving the entry aside, before deleting it
        os.rename(path, trash)
        os._exit(0)

    worker_guard.discard_entry = rename_only
    _rewrite_in_place(Path(entry) / WEIGHTS, b"PATCHED weights")
    WorkerGuard(Path(root)).load(entry, lambda *_: None)


def test_a_worker_killed_while_removing_an_entry_leaves_what_start_up_cleans(tmp_path):
    entry = _entry(tmp_path)
    child = mp.get_context("spawn").Process(target=_discard_then_die, args=(str(tmp_path), str(entry)))
    child.start()
    child.join(60)
    leftovers = os.listdir(tmp_path / "tmp")
    assert child.exitcode == 0 and len(leftovers) == 1 and not entry.exists()
    assert leftovers[0].startswith(f"evict.{child.pid}.")
    PatchedAdapterCache(tmp_path, 10**9)  # start-up: the owner is dead, so its leftover goes at once
    assert os.listdir(tmp_path / "tmp") == []
