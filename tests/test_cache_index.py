"""The cache's SQLite index, leases and key locks: totals, LRU, rebuild, staleness, processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from vllm_safelora.cache import CacheIndex, KeyLocks, PatchedAdapterCache
from vllm_safelora.cache.leases import owner_alive
from vllm_safelora.serving.tracking import LeasedLRU

from test_cache import entry_dirs, key, writer


def _rows(cache: PatchedAdapterCache) -> dict[str, tuple[int, str]]:
    return {d: (n, s) for d, n, s in cache.index._read("SELECT digest, nbytes, state FROM entries")}


def _disk_bytes(cache: PatchedAdapterCache) -> int:
    return sum(e.nbytes for e in cache.entries())


# ---------------------------------------------------------------- rows and totals


def test_index_tracks_entries_and_bytes(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    assert cache.startup.index_state == "missing" and cache.total_bytes() == 0
    for i in range(5):
        cache.get_or_create(key(i), writer(b"x" * (100 * (i + 1))))
    assert cache.total_bytes() == _disk_bytes(cache)
    assert set(_rows(cache)) == set(entry_dirs(tmp_path))
    cache.remove(key(2))
    assert cache.total_bytes() == _disk_bytes(cache) and len(_rows(cache)) == 4
    stats = cache.stats()
    assert (stats.entries, stats.nbytes) == (4, cache.total_bytes()) and stats.file_bytes > 0


def test_totals_follow_upserts(tmp_path):
    index = CacheIndex(tmp_path / "i.sqlite3")
    assert index.open() == "missing"
    index.record_use("a" * 64, 100)
    index.record_use("b" * 64, 50)
    index.record_use("a" * 64, 120)  # rebuilt: new size replaces the old
    index.publish("c" * 64, 7)
    assert index.total_bytes() == 177 and index.stats().entries == 3
    index.remove("b" * 64)
    index.remove("b" * 64)
    assert index.total_bytes() == 127 and index.stats().entries == 2


def test_lru_page_is_ordered_and_skips_leased(tmp_path):
    index = CacheIndex(tmp_path / "i.sqlite3")
    index.open()
    digests = [f"{i:064x}" for i in range(10)]
    for i, d in enumerate(digests):
        index.record_use(d, 10, now_ns=1000 - i)  # the last is the oldest
    index.register_owner("me", "h", 1)
    assert index.try_lease(digests[9], "me")
    page = index.lru_page((-1, ""), 3)
    assert [r.digest for r in page] == [digests[8], digests[7], digests[6]]
    nxt = index.lru_page((page[-1].last_use, page[-1].digest), 100)
    assert [r.digest for r in nxt] == digests[:6][::-1]


def test_lease_and_eviction_exclude_each_other(tmp_path):
    index = CacheIndex(tmp_path / "i.sqlite3")
    index.open()
    d = "d" * 64
    index.record_use(d, 10, now_ns=5)
    assert index.try_lease(d, "p1")
    assert not index.begin_eviction(d, index.get(d)[1])  # leased: not evictable
    index.drop_leases([d], "p1")
    last_use = index.get(d)[1]
    assert last_use > 5  # giving a lease back counts as a use
    assert not index.begin_eviction(d, last_use - 1)  # used since the candidate was read
    assert index.begin_eviction(d, last_use)
    assert not index.try_lease(d, "p2")  # being evicted: no lease, go the locked way
    index.publish(d, 10)  # the key-lock holder republished it
    assert index.try_lease(d, "p2")


# ---------------------------------------------------------------- rebuild and staleness


def test_rebuild_when_index_missing(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    for i in range(6):
        cache.get_or_create(key(i), writer(b"r" * (10 + i)))
    cache.index.set_last_use(key(3).digest(), 1)
    before = _rows(cache)
    total = cache.total_bytes()
    cache.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'index.sqlite3'}{suffix}").unlink(missing_ok=True)
    fresh = PatchedAdapterCache(tmp_path, 10**9)
    assert fresh.startup.index_state == "missing" and fresh.startup.added == 6
    assert _rows(fresh) == before and fresh.total_bytes() == total
    # Last use comes back from the manifests' mtimes (touched on every use).
    lru = fresh.index.lru_page((-1, ""), 6)
    assert {r.digest for r in lru} == set(before)


def test_rebuild_when_index_corrupt(tmp_path, caplog):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    for i in range(3):
        cache.get_or_create(key(i), writer())
    cache.close()
    index_file = tmp_path / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{index_file}{suffix}").unlink(missing_ok=True)
    index_file.write_bytes(b"this is not a database" * 100)
    with caplog.at_level("WARNING", logger="vllm_safelora.cache"):
        fresh = PatchedAdapterCache(tmp_path, 10**9)
    assert fresh.startup.index_state.startswith("corrupt") and fresh.startup.added == 3
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert any(p.name.startswith("index.sqlite3.corrupt-") for p in tmp_path.iterdir())
    assert fresh.total_bytes() == _disk_bytes(fresh)


def test_rebuild_when_schema_differs(tmp_path):
    PatchedAdapterCache(tmp_path, 10**9).get_or_create(key(), writer())
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()
    fresh = PatchedAdapterCache(tmp_path, 10**9)
    assert "schema version 99" in fresh.startup.index_state and fresh.startup.added == 1


def test_stale_index_is_reconciled_at_startup(tmp_path):
    """Entries added and removed behind the index's back (another tool, a restore, the
    worker guard) are found by comparing names at start-up, without reading every entry."""
    cache = PatchedAdapterCache(tmp_path, 10**9)
    for i in range(4):
        cache.get_or_create(key(i), writer())
    other = PatchedAdapterCache(tmp_path / "elsewhere", 10**9)
    made = other.get_or_create(key(9), writer(b"restored"))[0]
    cache.close()
    os.rename(made.path, tmp_path / "entries" / made.digest)  # appears without an index row
    gone = tmp_path / "entries" / key(0).digest()
    os.chmod(gone, 0o755)
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()  # disappears without the index knowing
    (tmp_path / "entries" / ("e" * 64)).mkdir()  # garbage with no manifest: indexed, evicted first
    fresh = PatchedAdapterCache(tmp_path, 10**9)
    assert fresh.startup.index_state == "ok" and fresh.startup.stale
    assert (fresh.startup.added, fresh.startup.removed, fresh.startup.unreadable) == (2, 1, 1)
    assert set(_rows(fresh)) == set(entry_dirs(tmp_path))
    assert fresh.index.lru_page((-1, ""), 1)[0].digest == "e" * 64
    again = PatchedAdapterCache(tmp_path, 10**9)
    assert not again.startup.stale


def test_entry_vanished_while_serving_is_repaired_lazily(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    entry = cache.get_or_create(key(), writer())[0]
    from vllm_safelora.cache import discard_entry

    discard_entry(entry.path, tmp_path / "tmp" / "gone")  # as the worker guard does
    assert cache.get(key()) is None
    again, hit = cache.get_or_create(key(), writer())
    assert not hit and cache.total_bytes() == again.nbytes
    # and a row without a directory is dropped by the eviction that meets it
    cache.index.record_use("f" * 64, 10**6, now_ns=1)
    cache.max_bytes = again.nbytes
    assert cache.evict_to_budget() == []
    assert cache.index.get("f" * 64) is None and cache.total_bytes() == again.nbytes


def test_evicting_state_left_by_a_crash_is_repaired_at_startup(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    entry = cache.get_or_create(key(), writer())[0]
    assert cache.index.begin_eviction(entry.digest, cache.index.get(entry.digest)[1])
    cache.close()  # "crashed" before deleting
    fresh = PatchedAdapterCache(tmp_path, 10**9)
    assert fresh.index.get(entry.digest)[2] == "ready"
    assert fresh.get_or_create(key(), writer(), lease=True)[1] is True


# ---------------------------------------------------------------- eviction while serving


def test_eviction_keeps_leased_entries_and_budget(tmp_path):
    probe = PatchedAdapterCache(tmp_path / "probe", 10**9)
    size = probe.get_or_create(key(0), writer(b"x" * 1000))[0].nbytes
    cache = PatchedAdapterCache(tmp_path / "c", 4 * size + 50)
    leased = [cache.get_or_create(key(i), writer(b"x" * 1000), lease=True)[0].digest for i in range(2)]
    for i in range(2, 12):
        cache.get_or_create(key(i), writer(b"x" * 1000))
        assert cache.total_bytes() <= cache.max_bytes
        assert cache.total_bytes() == _disk_bytes(cache)
    present = set(entry_dirs(tmp_path / "c"))
    assert set(leased) <= present  # the oldest, but leased
    assert {key(11).digest(), key(10).digest()} <= present
    # Giving the leases back makes them evictable, as used just now (LRU by last real use):
    # the two older unleased entries go first, then they do.
    for d in leased:
        cache.release(d)
    for i in range(12, 14):
        cache.get_or_create(key(i), writer(b"x" * 1000))
        assert set(leased) <= set(entry_dirs(tmp_path / "c"))
    cache.get_or_create(key(14), writer(b"x" * 1000))
    cache.get_or_create(key(15), writer(b"x" * 1000))
    assert not set(leased) & set(entry_dirs(tmp_path / "c"))
    assert cache.total_bytes() <= cache.max_bytes


def test_leased_entries_may_exceed_budget_and_say_so(tmp_path, caplog):
    cache = PatchedAdapterCache(tmp_path, 100)
    with caplog.at_level("WARNING", logger="vllm_safelora.cache"):
        for i in range(3):
            cache.get_or_create(key(i), writer(b"z" * 500), lease=True)
    assert len(entry_dirs(tmp_path)) == 3
    assert "over its 100-byte limit" in caplog.text and "leased" in caplog.text


def test_lease_counts_and_deferred_release(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    d = cache.get_or_create(key(), writer(), lease=True)[0].digest
    assert cache.lease(d) and cache.leases.held() == {d: 2}
    owner = cache.leases.owner
    cache.release(d)
    cache.release(d)
    assert cache.leases.held() == {}
    assert cache.index.leased(d) == [owner]  # deferred: the row goes at the next operation
    cache.flush_releases()
    assert cache.index.leased(d) == []
    cache.release(d)  # an extra release is harmless


def _lease_and_die(root: str, digest_out: str) -> None:
    cache = PatchedAdapterCache(Path(root), 10**9)
    cache.get_or_create(key(5), writer(), lease=True)
    Path(digest_out).write_text(cache.leases.owner)
    os._exit(0)  # no clean-up: the lease row stays behind


def test_dead_process_leases_are_ignored(tmp_path):
    ctx = mp.get_context("spawn")
    out = tmp_path / "owner.txt"
    p = ctx.Process(target=_lease_and_die, args=(str(tmp_path / "c"), str(out)))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    cache = PatchedAdapterCache(tmp_path / "c", 1)
    dead_owner = out.read_text()
    assert cache.index.leased(key(5).digest()) == [dead_owner]
    assert not owner_alive(cache.layout.owners_dir, dead_owner)
    cache.leases.owner  # noqa: B018 - register this process
    assert owner_alive(cache.layout.owners_dir, cache.leases.owner)
    assert cache.evict_to_budget() == [key(5).digest()]
    assert cache.index.owners() == [cache.leases.owner]
    assert os.listdir(cache.layout.owners_dir) == [f"{cache.leases.owner}.lock"]


# ---------------------------------------------------------------- several processes


def _hammer(root: str, worker: int, barrier, n: int) -> None:
    cache = PatchedAdapterCache(Path(root), 20 * 1200, lock_timeout_s=120)
    barrier.wait()
    for i in range(n):
        k = key(i % 25)  # overlapping keys: builds, hits, evictions and leases race
        entry, _hit = cache.get_or_create(k, writer(b"p" * 1000), lease=(i + worker) % 3 == 0)
        if (i + worker) % 3 == 0:
            cache.release(entry.digest)
    cache.close()


def test_processes_share_index_consistently(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    root = tmp_path / "shared"
    procs = [ctx.Process(target=_hammer, args=(str(root), w, barrier, 60)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = PatchedAdapterCache(root, 20 * 1200)
    assert not cache.startup.stale, cache.startup  # every change went through the index
    rows = _rows(cache)
    assert set(rows) == set(entry_dirs(root)) and all(s == "ready" for _, s in rows.values())
    assert cache.total_bytes() == _disk_bytes(cache) <= cache.max_bytes
    assert cache.index.stats().leases == 0 and cache.index.owners() == []
    assert os.listdir(root / "locks") == [] and os.listdir(root / "tmp") == []


# ---------------------------------------------------------------- key locks


def test_lock_files_do_not_accumulate(tmp_path):
    locks = KeyLocks(tmp_path, timeout_s=5)
    for i in range(50):
        with locks.hold(f"k{i}"):
            assert (tmp_path / f"k{i}.lock").exists()
    assert os.listdir(tmp_path) == [] and locks.in_use() == 0


def test_lock_still_exclusive_when_file_is_recycled(tmp_path):
    locks_a, locks_b = KeyLocks(tmp_path, timeout_s=5), KeyLocks(tmp_path, timeout_s=5)
    inside, order = threading.Event(), []

    def second():
        inside.wait()
        with locks_b.hold("k"):
            order.append("b")

    t = threading.Thread(target=second)
    t.start()
    with locks_a.hold("k"):
        inside.set()
        time.sleep(0.2)  # b is waiting on the file a will unlink
        order.append("a")
    t.join()
    assert order == ["a", "b"]
    with locks_a.hold("k", blocking=False) as got:
        assert got


# ---------------------------------------------------------------- the bounded LRU map


class _Book:
    def __init__(self):
        self.held: dict[str, int] = {}
        self.refuse: set[str] = set()

    def lease(self, digest):
        if digest in self.refuse:
            return False
        self.held[digest] = self.held.get(digest, 0) + 1
        return True

    def release(self, digest):
        self.held[digest] -= 1
        if not self.held[digest]:
            del self.held[digest]


class _Item:
    def __init__(self, digest):
        self.digest = digest


def test_leased_lru_bounds_and_leases():
    book = _Book()
    lru = LeasedLRU(3, book)
    for i in range(5):
        lru.put(f"k{i}", _Item(f"d{i}"))
    assert list(lru.snapshot()) == ["k2", "k3", "k4"] and book.held == {"d2": 1, "d3": 1, "d4": 1}
    lru.get("k2")  # now most recent
    _, dropped = lru.put("k5", _Item("d5"))
    assert [k for k, _ in dropped] == ["k3"] and "d3" not in book.held
    previous, _ = lru.put("k2", _Item("d2"))  # same entry again: lease kept, not retaken
    assert previous.digest == "d2" and book.held["d2"] == 1
    lru.put("k2", _Item("d9"))  # replaced by another entry
    assert "d2" not in book.held and book.held["d9"] == 1
    assert lru.pop("k2").digest == "d9" and "d9" not in book.held
    book.refuse.add("dx")
    lru.put("kx", _Item("dx"))  # could not lease: stored, nothing to give back later
    lru.clear()
    assert book.held == {} and len(lru) == 0


def test_leased_lru_takes_over_a_handed_lease():
    book = _Book()
    lru = LeasedLRU(2, book)
    book.lease("d1")
    lru.put("k1", _Item("d1"), leased=True)
    assert book.held == {"d1": 1}
    book.lease("d1")
    lru.put("k1", _Item("d1"), leased=True)  # already held for this key: the extra goes back
    assert book.held == {"d1": 1}
    with pytest.raises(ValueError):
        LeasedLRU(0, book)


def test_index_helpers_report_cheaply(tmp_path):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    cache.get_or_create(key(), writer(), lease=True)
    s = cache.stats()
    assert (s.entries, s.leases, s.owners) == (1, 1, 1)
    assert json.dumps(s.__dict__)  # plain numbers, for benchmarks and status pages


def test_lease_rows_match_counts_under_threads(tmp_path):
    """Leases taken, given back and flushed from many threads: a row exists exactly while
    some lease is held (a flush never deletes the row of a lease taken meanwhile)."""
    cache = PatchedAdapterCache(tmp_path, 10**9)
    digests = [cache.get_or_create(key(i), writer())[0].digest for i in range(3)]
    stop = threading.Event()
    errors: list[str] = []

    def churn(seed: int):
        i = seed
        while not stop.is_set():
            d = digests[i % 3]
            if cache.lease(d):
                if cache.leases.owner not in cache.index.leased(d):
                    errors.append(f"held {d[:8]} without a row")
                cache.release(d)
            if i % 7 == 0:
                cache.flush_releases()
            i += 1

    threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    cache.flush_releases()
    assert cache.leases.held() == {} and cache.index.stats().leases == 0


def test_an_entry_that_cannot_be_deleted_stays_and_serving_goes_on(tmp_path, monkeypatch, caplog):
    cache = PatchedAdapterCache(tmp_path, 10**9)
    old = cache.get_or_create(key(0), writer(b"o" * 500))[0]
    cache.max_bytes = old.nbytes + 10

    def broken(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache.evictor, "_discard", broken)
    with caplog.at_level("ERROR", logger="vllm_safelora.cache"):
        new, hit = cache.get_or_create(key(1), writer(b"n" * 500))
    assert not hit and new.path.is_dir() and old.path.is_dir()
    assert "could not delete entry" in caplog.text
    assert cache.index.get(old.digest)[2] == "ready"  # evictable again once the disk is fixed
    monkeypatch.undo()
    assert cache.evict_to_budget(protect={new.digest}) == [old.digest]
