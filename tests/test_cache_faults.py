"""A cache on a file system that is full (a real tmpfs): new entries are a 503-class
CacheUnavailable naming the cache directory, cached entries keep being served, nothing is torn,
and everything works again once space is freed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from support.smallfs import small_fs
from vllm_safelora.cache import CacheKey, PatchedAdapterCache
from vllm_safelora.cache.faults import storage_fault
from vllm_safelora.errors import CacheUnavailable, Overloaded


def key(n: int) -> CacheKey:
    return CacheKey(hashlib.sha256(str(n).encode()).hexdigest(), "bank-1", "policy-1")


def build(payload: bytes):
    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (tmp / "adapter_model.safetensors").write_bytes(payload)

    return write


@pytest.fixture
def fs(tmp_path):
    with small_fs(tmp_path / "fs", 8 << 20) as fs:
        yield fs


def _intact(cache: PatchedAdapterCache) -> list[str]:
    return sorted(e.path.name for e in cache.entries() if cache.entry_at(e.path) is not None)


def test_a_full_cache_refuses_new_entries_and_keeps_serving_cached_ones(fs):
    cache = PatchedAdapterCache(fs.path / "cache", 1 << 30)
    cached, hit = cache.get_or_create(key(1), build(b"a" * 1000), lease=True)
    assert not hit
    fs.fill()
    with pytest.raises(CacheUnavailable) as info:
        cache.get_or_create(key(2), build(b"b" * 100_000), lease=True)
    exc = info.value
    assert isinstance(exc, Overloaded) and exc.fault == "full" and exc.retry_after_s > 0
    assert f"(cache_dir {fs.path / 'cache'}) is full" in str(exc) and "already cached are still served" in str(exc)
    # a hit: verified, leased, served, although neither its last use nor its lease row can be written
    for _ in range(3):
        again, hit = cache.get_or_create(key(1), build(b"unused"), lease=True)
        assert hit and again.path == cached.path
    cache.release(cached.digest)
    assert not any(name.startswith("build") for name in os.listdir(cache.tmp_dir))  # nothing half-built kept
    assert _intact(cache) == [cached.digest]
    fs.drain()
    made, hit = cache.get_or_create(key(2), build(b"b" * 100_000), lease=True)
    assert not hit and _intact(cache) == sorted([cached.digest, made.digest])
    # the leases held while the index could not be written were recorded once it could
    assert cache.index.leased(cached.digest) and cache.index.leased(made.digest)
    cache.close()


@pytest.mark.parametrize(
    "exc, fault",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "full"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (sqlite3.OperationalError("database or disk is full"), "full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read_only"),
        (OSError(errno.EACCES, "Permission denied"), None),
        (sqlite3.OperationalError("database is locked"), None),
        (ValueError("no"), None),
    ],
)
def test_storage_faults_are_told_apart(exc, fault):
    """A read-only remount cannot be made under a live cache (the kernel refuses it while files are
    open for writing: EBUSY), so the read-only case is checked where it is decided."""
    assert storage_fault(exc) == fault
    wrapped = RuntimeError("while sealing")
    wrapped.__cause__ = exc
    assert storage_fault(wrapped) == fault
