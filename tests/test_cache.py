"""Patched-adapter cache: atomicity, single-flight, verification, LRU, restarts."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_safelora.cache import FORMAT_VERSION, MANIFEST_NAME, CacheKey, PatchedAdapterCache
from vllm_safelora.errors import ConfigError


def key(n: int = 0, bank: str = "bank-1", policy: str = "policy-1") -> CacheKey:
    return CacheKey(hashlib.sha256(str(n).encode()).hexdigest(), bank, policy)


def writer(payload: bytes = b"patched weights", name: str = "adapter_model.safetensors"):
    def build(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (tmp / name).write_bytes(payload)

    return build


def entry_dirs(root: Path) -> list[str]:
    return sorted(os.listdir(root / "entries"))


# ---------------------------------------------------------------- keys


def test_key_digest_stable_and_distinct():
    k = key(1)
    assert k.digest() == key(1).digest() and len(k.digest()) == 64
    assert len({key(1).digest(), key(2).digest(), key(1, bank="b2").digest(), key(1, policy="p2").digest()}) == 4


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_key_digest_keeps_field_boundaries(b1, p1, b2, p2):
    h = "0" * 64
    if (b1, p1) != (b2, p2):
        assert CacheKey(h, b1, p1).digest() != CacheKey(h, b2, p2).digest()


@pytest.mark.parametrize(
    "bad", [dict(adapter_hash="xyz"), dict(adapter_hash="A" * 64), dict(bank_id=""), dict(policy_id=None)]
)
def test_key_validation(bad):
    fields = dict(adapter_hash="0" * 64, bank_id="b", policy_id="p") | bad
    with pytest.raises(ValueError):
        CacheKey(**fields)


# ---------------------------------------------------------------- basic behaviour


def test_miss_then_hit(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    assert cache.get(key()) is None
    entry, hit = cache.get_or_create(key(), writer())
    assert hit is False
    assert entry.path == tmp_path / "entries" / key().digest()
    assert set(entry.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert entry.files["adapter_model.safetensors"] == blake3.blake3(b"patched weights").hexdigest()
    manifest = json.loads((entry.path / MANIFEST_NAME).read_text())
    assert manifest["key"] == key().as_dict() and manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["files"]["adapter_model.safetensors"] == {
        "blake3": entry.files["adapter_model.safetensors"],
        "size": 15,
    }
    assert entry.nbytes == sum(f.stat().st_size for f in entry.path.iterdir())

    entry2, hit2 = cache.get_or_create(key(), writer(b"never used"))
    assert hit2 is True and entry2 == entry
    assert cache.get(key()) == entry
    assert [e.key for e in cache.entries()] == [key()]
    assert cache.total_bytes() == entry.nbytes
    assert os.listdir(tmp_path / "tmp") == []


def test_remove(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    cache.get_or_create(key(), writer())
    assert cache.remove(key()) is True
    assert cache.remove(key()) is False
    assert cache.get(key()) is None and entry_dirs(tmp_path) == []


# ---------------------------------------------------------------- atomicity


class Boom(Exception):
    pass


def test_build_raising_leaves_nothing(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)

    def build(tmp: Path):
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise Boom("projection failed")

    with pytest.raises(Boom, match="projection failed"):
        cache.get_or_create(key(), build)
    assert entry_dirs(tmp_path) == []
    assert os.listdir(tmp_path / "tmp") == []
    # and the key is buildable afterwards
    assert cache.get_or_create(key(), writer())[1] is False


@pytest.mark.parametrize(
    "bad_build",
    [
        lambda tmp: None,  # wrote nothing
        lambda tmp: (tmp / MANIFEST_NAME).write_text("{}"),
        lambda tmp: (tmp / "sub").mkdir(),
        lambda tmp: (tmp / "link").symlink_to("/etc/passwd"),
    ],
)
def test_build_contract_violations_leave_nothing(tmp_path, bad_build):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    with pytest.raises(RuntimeError):
        cache.get_or_create(key(), bad_build)
    assert entry_dirs(tmp_path) == [] and os.listdir(tmp_path / "tmp") == []


# ---------------------------------------------------------------- single-flight


def test_single_flight_threads(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    calls = []
    barrier = threading.Barrier(8)
    results = []

    def build(tmp: Path):
        calls.append(1)
        time.sleep(0.2)
        writer()(tmp)

    def worker():
        barrier.wait()
        results.append(cache.get_or_create(key(), build))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 7
    assert len({e.path for e, _ in results}) == 1


def test_different_keys_build_concurrently(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    inside = threading.Barrier(2, timeout=5)  # would time out if builds were serialised

    def build(tmp: Path):
        inside.wait()
        return writer()(tmp)

    threads = [threading.Thread(target=cache.get_or_create, args=(key(i), build)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entry_dirs(tmp_path)) == 2


def _process_worker(root: str, counter: str, barrier) -> None:
    cache = PatchedAdapterCache(Path(root), 10**9)

    def build(tmp: Path):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return writer()(tmp)

    barrier.wait()
    entry, _hit = cache.get_or_create(key(), build)
    assert entry.path.is_dir()


def test_single_flight_processes(tmp_path):
    ctx = mp.get_context("spawn")
    counter = tmp_path / "counter.txt"
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=_process_worker, args=(str(tmp_path / "cache"), str(counter), barrier)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().splitlines() == ["built"]
    assert len(entry_dirs(tmp_path / "cache")) == 1


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize(
    "damage",
    [
        "flip_byte",
        "delete_file",
        "delete_manifest",
        "garbage_manifest",
        "wrong_key_in_manifest",
        "extra_file",
        "truncate",
    ],
)
def test_corrupt_entry_detected_and_rebuilt(tmp_path, damage, caplog):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    entry, _ = cache.get_or_create(key(), writer(b"A" * 100))
    weights = entry.path / "adapter_model.safetensors"
    manifest = entry.path / MANIFEST_NAME
    if damage == "flip_byte":
        weights.chmod(0o644)
        weights.write_bytes(b"B" + b"A" * 99)  # same size: only the hash catches it
    elif damage == "delete_file":
        weights.unlink()
    elif damage == "delete_manifest":
        manifest.unlink()
    elif damage == "garbage_manifest":
        manifest.write_text("{not json")
    elif damage == "wrong_key_in_manifest":
        doc = json.loads(manifest.read_text())
        doc["key"]["bank_id"] = "other-bank"
        manifest.write_text(json.dumps(doc))
    elif damage == "extra_file":
        (entry.path / "new_embeddings.safetensors").write_bytes(b"surprise")
    elif damage == "truncate":
        weights.chmod(0o644)
        weights.write_bytes(b"A")

    with caplog.at_level("WARNING", logger="vllm_safelora.cache"):
        assert cache.get(key()) is None
    assert "failed verification" in caplog.text and key().digest()[:16] in caplog.text
    assert entry_dirs(tmp_path) == []

    calls = []
    rebuilt, hit = cache.get_or_create(key(), lambda tmp: calls.append(1) or writer(b"A" * 100)(tmp))
    assert (hit, calls) == (False, [1])
    assert cache.get(key()) == rebuilt


def test_corrupt_entry_rebuilt_by_get_or_create(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    entry, _ = cache.get_or_create(key(), writer(b"good"))
    w = entry.path / "adapter_model.safetensors"
    w.chmod(0o644)
    w.write_bytes(b"evil")
    entry2, hit = cache.get_or_create(key(), writer(b"good"))
    assert hit is False
    assert (entry2.path / "adapter_model.safetensors").read_bytes() == b"good"


def test_verify_false_still_checks_sizes(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9, verify=False)
    entry, _ = cache.get_or_create(key(), writer(b"good"))
    w = entry.path / "adapter_model.safetensors"
    w.chmod(0o644)
    w.write_bytes(b"evi1")  # same size: not detected without hashing (documented trade-off)
    assert cache.get(key()) is not None
    w.write_bytes(b"longer")
    assert cache.get(key()) is None


def test_entry_files_are_read_only(tmp_path):
    entry, _ = PatchedAdapterCache(tmp_path, 10**9).get_or_create(key(), writer())
    assert all(not (p.stat().st_mode & 0o222) for p in entry.path.iterdir() if p.name != MANIFEST_NAME)


# ---------------------------------------------------------------- LRU


def _set_last_used(cache: PatchedAdapterCache, k: CacheKey, t: float) -> None:
    # Last use lives in the index (the manifest's mtime only seeds a rebuilt index).
    cache.index.set_last_use(k.digest(), int(t * 1e9))


def test_lru_eviction_order_and_budget(tmp_path):
    probe = PatchedAdapterCache(tmp_path / "probe", 10**9)
    size = probe.get_or_create(key(0), writer(b"x" * 1000))[0].nbytes
    cache = PatchedAdapterCache(tmp_path / "c", 3 * size + 100)  # room for three entries (manifests vary a little)
    for i in range(3):
        cache.get_or_create(key(i), writer(b"x" * 1000))
    now = time.time()
    for i, age in [(0, 300), (1, 100), (2, 200)]:
        _set_last_used(cache, key(i), now - age)
    assert cache.total_bytes() == sum(e.nbytes for e in cache.entries()) <= cache.max_bytes

    # a hit on key 0 makes it the most recently used
    assert cache.get(key(0)) is not None
    # a fourth entry evicts the least recently used: key 2 (200 s ago), not key 0
    cache.get_or_create(key(3), writer(b"x" * 1000))
    assert cache.get(key(2)) is None
    assert all(cache.get(key(i)) is not None for i in (0, 1, 3))
    assert cache.total_bytes() <= cache.max_bytes


def test_evict_to_budget_respects_protect(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    for i in range(4):
        cache.get_or_create(key(i), writer(b"y" * 500))
        _set_last_used(cache, key(i), 1000 + i)
    size = max(e.nbytes for e in cache.entries())  # manifests differ by a byte or two ("created")
    cache.max_bytes = 2 * size
    evicted = cache.evict_to_budget(protect={key(0).digest()})
    assert evicted == [key(1).digest(), key(2).digest()]
    assert {e.key for e in cache.entries()} == {key(0), key(3)}
    assert cache.evict_to_budget() == []


def test_new_entry_larger_than_budget_is_kept(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 100)
    cache.get_or_create(key(0), writer(b"z" * 50))
    entry, _ = cache.get_or_create(key(1), writer(b"z" * 5000))
    assert cache.get(key(1)) == entry and cache.get(key(0)) is None


def test_eviction_skips_entries_locked_by_others(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    for i in range(2):
        cache.get_or_create(key(i), writer(b"q" * 500))
        _set_last_used(cache, key(i), 1000 + i)
    cache.max_bytes = 1
    with cache.locks.hold(key(0).digest()):
        evicted = []
        t = threading.Thread(target=lambda: evicted.extend(cache.evict_to_budget()))
        t.start()
        t.join()
    assert evicted == [key(1).digest()]
    assert cache.get(key(0)) is not None


# ---------------------------------------------------------------- restarts and crashes


def test_restart_persistence(tmp_path):
    entry, _ = PatchedAdapterCache(tmp_path, 10**9).get_or_create(key(), writer())
    fresh = PatchedAdapterCache(tmp_path, 10**9)
    again, hit = fresh.get_or_create(key(), writer(b"never"))
    assert hit is True and again == entry


def test_stale_tmp_cleanup(tmp_path):
    from vllm_safelora import cache as cache_mod

    PatchedAdapterCache(tmp_path, 10**9)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    dead_pid = p.pid
    host = cache_mod._HOST
    tmpdir = tmp_path / "tmp"
    dead = tmpdir / f"build.{dead_pid}.{host}.abcd.1234"
    mine = tmpdir / f"build.{os.getpid()}.{host}.abcd.5678"
    other_host = tmpdir / f"build.{dead_pid}.elsewhere.abcd.9abc"
    old = tmpdir / f"evict.{os.getpid()}.{host}.abcd.def0"
    junk = tmpdir / "something-unparseable"
    for d in (dead, mine, other_host, old, junk):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    ancient = time.time() - 2 * 3600
    os.utime(old, (ancient, ancient))

    PatchedAdapterCache(tmp_path, 10**9)  # start-up cleans
    assert sorted(os.listdir(tmpdir)) == sorted([mine.name, other_host.name, junk.name])


def test_crash_during_build_leaves_no_entry(tmp_path):
    # A child process dies mid-build (os._exit): no entry appears, and the next
    # start-up removes its temp dir.
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_crashing_worker, args=(str(tmp_path),))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 3
    assert entry_dirs(tmp_path) == []
    assert len(os.listdir(tmp_path / "tmp")) == 1
    cache = PatchedAdapterCache(tmp_path, 10**9)
    assert os.listdir(tmp_path / "tmp") == []
    # the crashed process's flock died with it
    assert cache.get_or_create(key(), writer())[1] is False


def _crashing_worker(root: str) -> None:
    def build(tmp: Path):
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        os._exit(3)

    PatchedAdapterCache(Path(root), 10**9).get_or_create(key(), build)


# ---------------------------------------------------------------- configuration errors


def test_unwritable_root_is_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created|not a directory"):
        PatchedAdapterCache(blocker / "cache", 10**9)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ConfigError, match=str(ro)):
                PatchedAdapterCache(ro / "cache", 10**9)
        finally:
            ro.chmod(0o700)


@pytest.mark.parametrize("max_bytes", [0, -1, 1.5])
def test_bad_budget_is_config_error(tmp_path, max_bytes):
    with pytest.raises(ConfigError):
        PatchedAdapterCache(tmp_path, max_bytes)


def test_lock_timeout(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9, lock_timeout_s=0.2)
    other = PatchedAdapterCache(tmp_path, 10**9, lock_timeout_s=0.2)  # same dir, separate thread locks
    with cache._locked(key().digest()), pytest.raises(TimeoutError, match="may be stuck"):
        other.get_or_create(key(), writer())


def test_format_1_sha256_entry_is_stale_never_trusted(tmp_path, caplog):
    """An entry written before blake3 (format 1, sha256 manifest) at the key's path is
    treated like any corrupt entry: not served, removed, rebuilt; never a crash."""
    cache = PatchedAdapterCache(tmp_path, 10**9)
    entry, _ = cache.get_or_create(key(), writer(b"old weights"))
    manifest = entry.path / MANIFEST_NAME
    doc = json.loads(manifest.read_text())
    doc["format_version"] = 1
    doc["files"] = {
        name: {"sha256": hashlib.sha256((entry.path / name).read_bytes()).hexdigest(), "size": meta["size"]}
        for name, meta in doc["files"].items()
    }
    manifest.chmod(0o644)
    manifest.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="vllm_safelora.cache"):
        assert cache.get(key()) is None
    assert "format 1 is not 2" in caplog.text
    rebuilt, hit = cache.get_or_create(key(), writer(b"new weights"))
    assert hit is False and (rebuilt.path / "adapter_model.safetensors").read_bytes() == b"new weights"
    # A fresh process (index rebuilt from the directory) gets the same answer.
    cache.close()
    again = PatchedAdapterCache(tmp_path, 10**9)
    assert again.get(key()) == rebuilt


def test_hashes_the_build_returns_are_recorded_without_reading_back(tmp_path, monkeypatch):
    from vllm_safelora.adapters import SerializedAdapter, write_adapter_files
    from vllm_safelora.cache import seal

    read_back = []
    real = seal.fast_hash_file
    monkeypatch.setattr(seal, "fast_hash_file", lambda p, **kw: read_back.append(p.name) or real(p, **kw))
    adapter = SerializedAdapter(b'{"r": 4}', b"weights" * 100, {"extra.json": b"{}"})
    cache = PatchedAdapterCache(tmp_path, 10**9)

    def build(tmp: Path):
        written = write_adapter_files(tmp, adapter)
        (tmp / "not_returned.txt").write_bytes(b"x")
        return written

    entry, hit = cache.get_or_create(key(), build)
    assert hit is False and read_back == ["not_returned.txt"]
    assert entry.files["adapter_model.safetensors"] == blake3.blake3(b"weights" * 100).hexdigest()
    assert cache.get(key()) == entry  # and what was recorded is what a full verification finds
