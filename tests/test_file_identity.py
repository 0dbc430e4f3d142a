"""The identity rule: once this process hashed a file, an unchanged (dev, inode, size, mtime,
ctime) means unchanged bytes, except within a timestamp tick of a write (racily clean)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

import vllm_safelora.cache.entry as entry_module
from vllm_safelora import fsutil
from vllm_safelora.cache import CacheKey, PatchedAdapterCache, entry_signature, signature_racy
from vllm_safelora.cache.worker_guard import EntryRefused, WorkerGuard
from vllm_safelora.fsutil import FileIdentity, ctime_trusted, filesystem_type

WEIGHTS = "adapter_model.safetensors"


def _entry(root: Path, payload: bytes = b"patched weights") -> Path:
    def build(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (tmp / WEIGHTS).write_bytes(payload)

    cache = PatchedAdapterCache(root, 10**9)
    entry, _ = cache.get_or_create(CacheKey(hashlib.sha256(payload).hexdigest(), "bank", "policy"), build)
    cache.close()
    return entry.path


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    st = os.stat(path)
    assert len(data) == st.st_size
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)
    os.chmod(path, st.st_mode & 0o777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def hash_calls(monkeypatch):
    """Counts every hash of an entry's files (the reads the identity rule saves)."""
    calls = []
    real_file, real_bytes = entry_module.fast_hash_file, entry_module.fast_hash
    monkeypatch.setattr(entry_module, "fast_hash_file", lambda *a, **k: calls.append("file") or real_file(*a, **k))
    monkeypatch.setattr(entry_module, "fast_hash", lambda *a, **k: calls.append("bytes") or real_bytes(*a, **k))
    return calls


@pytest.fixture()
def no_racy_window(monkeypatch):
    """Files made by a test are seconds old at most: without this, every one is 'racily clean'."""
    monkeypatch.setattr(fsutil, "RACY_WINDOW_NS", 0)


def test_an_in_place_write_that_restores_size_and_mtime_still_moves_ctime(tmp_path):
    f = tmp_path / "w"
    f.write_bytes(b"abcdef")
    before = FileIdentity.of(os.stat(f))
    time.sleep(0.02)  # past one kernel timestamp tick
    _rewrite_keeping_size_and_mtime(f, b"ABCDEF")
    after = FileIdentity.of(os.stat(f))
    assert (after.size, after.mtime_ns, after.ino) == (before.size, before.mtime_ns, before.ino)
    assert after != before and after.ctime_ns > before.ctime_ns


def test_an_identity_taken_right_after_a_write_is_racy(tmp_path):
    f = tmp_path / "w"
    f.write_bytes(b"x")
    ident = FileIdentity.of(os.stat(f))
    assert ident.racy(time.time_ns())
    assert not ident.racy(time.time_ns() + 2 * fsutil.RACY_WINDOW_NS)


def test_network_file_systems_keep_the_full_check(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 27 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        f"30 22 0:40 / {tmp_path}/nfs rw,relatime - nfs4 server:/export rw\n"
        f"31 22 0:41 / {tmp_path}/fuse rw,relatime - fuse.sshfs host: rw\n"
    )
    for sub in ("nfs", "fuse", "local"):
        (tmp_path / sub).mkdir()
    assert filesystem_type(tmp_path / "nfs" / "x", str(mountinfo)) == "nfs4"
    assert ctime_trusted(tmp_path / "nfs", str(mountinfo)) == (False, "nfs4")
    assert ctime_trusted(tmp_path / "fuse", str(mountinfo)) == (False, "fuse.sshfs")
    assert ctime_trusted(tmp_path / "local", str(mountinfo)) == (True, "ext4")
    assert ctime_trusted(tmp_path, str(tmp_path / "missing"))[0] is False  # cannot tell: full check


def test_the_worker_hashes_an_entry_once_then_checks_its_identity(tmp_path, hash_calls, no_racy_window):
    entry = _entry(tmp_path)
    guard = WorkerGuard(tmp_path)
    seen = []
    guard.load(str(entry), lambda path, data: seen.append(bytes(data)))
    first = len(hash_calls)
    assert first >= 2  # the small file and the weights
    guard.load(str(entry), lambda path, data: seen.append(bytes(data)))
    assert len(hash_calls) == first, "an unchanged entry was hashed again"
    assert seen == [b"patched weights"] * 2


@pytest.mark.parametrize("victim", [WEIGHTS, "adapter_config.json"])
def test_an_alteration_after_the_first_load_is_caught_by_identity(tmp_path, no_racy_window, victim):
    entry = _entry(tmp_path)
    guard = WorkerGuard(tmp_path)
    guard.load(str(entry), lambda path, data: None)
    time.sleep(0.02)
    original = (entry / victim).read_bytes()
    _rewrite_keeping_size_and_mtime(entry / victim, original.swapcase())
    with pytest.raises(EntryRefused) as refused:
        guard.load(str(entry), lambda path, data: pytest.fail("vLLM must not read an altered entry"))
    assert refused.value.removed and not entry.exists()


def test_a_file_added_to_a_verified_entry_is_caught(tmp_path, no_racy_window):
    entry = _entry(tmp_path)
    guard = WorkerGuard(tmp_path)
    guard.load(str(entry), lambda path, data: None)
    time.sleep(0.02)
    os.chmod(entry, 0o755)
    (entry / "new_embeddings.safetensors").write_bytes(b"x")
    with pytest.raises(EntryRefused):
        guard.load(str(entry), lambda path, data: pytest.fail("vLLM must not read an altered entry"))


def test_a_write_in_the_same_tick_as_the_hash_is_caught_at_the_next_use(tmp_path, hash_calls):
    """The racy case: the entry was written and hashed within one tick, then altered in that
    tick with size and mtime restored. Its identity may be unchanged, so it is not trusted."""
    entry = _entry(tmp_path)
    guard = WorkerGuard(tmp_path)
    guard.load(str(entry), lambda path, data: None)
    before = entry_signature(entry)
    _rewrite_keeping_size_and_mtime(entry / WEIGHTS, b"PATCHED WEIGHTS")
    assert signature_racy(before, time.time_ns())
    calls = len(hash_calls)
    with pytest.raises(EntryRefused) as refused:
        guard.load(str(entry), lambda path, data: pytest.fail("vLLM must not read an altered entry"))
    assert len(hash_calls) > calls and "failed verification" in refused.value.problem


def test_a_cache_hit_on_an_unchanged_entry_costs_no_hash(tmp_path, hash_calls, no_racy_window):
    entry_path = _entry(tmp_path, b"weights-1")
    cache = PatchedAdapterCache(tmp_path, 10**9)
    key = CacheKey(hashlib.sha256(b"weights-1").hexdigest(), "bank", "policy")
    assert cache.get(key).path == entry_path
    first = len(hash_calls)
    for _ in range(3):
        assert cache.get(key).path == entry_path
    assert len(hash_calls) == first
    time.sleep(0.02)
    _rewrite_keeping_size_and_mtime(entry_path / WEIGHTS, b"WEIGHTS-1")
    assert cache.get(key) is None  # altered: removed, never served
    assert not entry_path.exists()


def test_on_an_untrusted_file_system_every_hit_hashes(tmp_path, hash_calls, no_racy_window, monkeypatch):
    import vllm_safelora.cache.store as store_module

    monkeypatch.setattr(store_module, "ctime_trusted", lambda path: (False, "nfs4"))
    _entry(tmp_path, b"weights-2")
    cache = PatchedAdapterCache(tmp_path, 10**9)
    key = CacheKey(hashlib.sha256(b"weights-2").hexdigest(), "bank", "policy")
    cache.get(key)
    first = len(hash_calls)
    cache.get(key)
    assert len(hash_calls) > first and (cache.ctime_trusted, cache.filesystem) == (False, "nfs4")
