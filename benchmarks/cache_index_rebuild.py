"""How long the cache's start-up takes with many entries, and what one operation costs then.

    python -m benchmarks.cache_index_rebuild --entries 100000 --root /tmp/safelora-100k

Makes ``--entries`` synthetic entries (real manifests, one small file each; kept between
runs under ``--root``), then measures: start-up with no index (full rebuild from
entries/), start-up with a consistent index (names compared only), start-up after
entries were added and removed behind the index's back, and with that many entries
indexed: a hit, a miss that evicts one entry, and the byte total. Prints one JSON object.
File contents come from the page cache here (just written); a cold disk is slower.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from benchmarks._common import REPO_ROOT  # noqa: F401 (puts tests/support on sys.path)
from vllm_safelora.cache import FILE_HASH, FORMAT_VERSION, MANIFEST_NAME, CacheKey, PatchedAdapterCache
from vllm_safelora.fsutil import fast_hash
from support.procstats import fd_count

PAYLOAD = b'{"r": 4}'


def _key(i: int) -> CacheKey:
    return CacheKey(hashlib.sha256(f"synthetic-{i}".encode()).hexdigest(), "bank-bench", "policy-bench")


def make_entries(entries_dir: Path, start: int, stop: int) -> None:
    """Write entries start..stop-1 the way the cache seals them (manifest + files, read-only)."""
    sha = fast_hash(PAYLOAD)
    for i in range(start, stop):
        key = _key(i)
        path = entries_dir / key.digest()
        if path.exists():
            continue
        path.mkdir()
        (path / "adapter_config.json").write_bytes(PAYLOAD)
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key.as_dict(),
            "digest": key.digest(),
            "files": {"adapter_config.json": {FILE_HASH: sha, "size": len(PAYLOAD)}},
            "nbytes": len(PAYLOAD),
            "created": time.time(),
        }
        (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _drop_index(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.sqlite3'}{suffix}").unlink(missing_ok=True)


def _open(root: Path, max_bytes: int) -> tuple[PatchedAdapterCache, float]:
    t0 = time.perf_counter()
    cache = PatchedAdapterCache(root, max_bytes)
    return cache, time.perf_counter() - t0


def _writer(i: int):
    def build(tmp: Path):
        (tmp / "adapter_config.json").write_bytes(PAYLOAD + str(i).encode())

    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--root", type=Path, default=Path("/tmp/safelora-cache-bench"))
    ap.add_argument("--ops", type=int, default=200, help="hits and misses timed at full size")
    args = ap.parse_args()
    root, n = args.root, args.entries
    (root / "entries").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_entries(root / "entries", 0, n)
    made_s = time.perf_counter() - t0
    out: dict = {"entries": n, "make_entries_s": round(made_s, 2)}

    _drop_index(root)
    cache, seconds = _open(root, 10**15)
    out["startup_no_index_s"] = round(seconds, 2)
    out["rebuild"] = {
        "state": cache.startup.index_state,
        "added": cache.startup.added,
        "s": round(cache.startup.seconds, 2),
    }
    cache.close()

    cache, seconds = _open(root, 10**15)
    out["startup_consistent_index_s"] = round(seconds, 2)
    cache.close()

    # Stale: 100 entries removed and 100 added behind the index's back.
    for i in range(100):
        shutil.rmtree(root / "entries" / _key(i).digest())
    make_entries(root / "entries", n, n + 100)
    cache, seconds = _open(root, 10**15)
    out["startup_stale_index_s"] = round(seconds, 2)
    out["stale_repair"] = {"added": cache.startup.added, "removed": cache.startup.removed}
    make_entries(root / "entries", 0, 100)  # put them back for the next run
    cache.close()

    # Operations with n entries indexed: the budget is full, so every miss evicts one.
    cache, _ = _open(root, 1)
    total = cache.total_bytes()
    cache.max_bytes = total
    fds0 = fd_count()
    t_total = []
    for _ in range(args.ops):
        t = time.perf_counter()
        cache.total_bytes()
        t_total.append(time.perf_counter() - t)
    hits, misses = [], []
    for i in range(args.ops):
        t = time.perf_counter()
        cache.get_or_create(_key(n - 1 - i), _writer(i), lease=True)
        hits.append(time.perf_counter() - t)
        cache.release(_key(n - 1 - i).digest())
    for i in range(args.ops):
        t = time.perf_counter()
        cache.get_or_create(_key(10**9 + i), _writer(i))
        misses.append(time.perf_counter() - t)
    out["at_full_size_ms"] = {
        "total_bytes_median": round(statistics.median(t_total) * 1e3, 3),
        "hit_with_lease_median": round(statistics.median(hits) * 1e3, 3),
        "miss_evicting_one_median": round(statistics.median(misses) * 1e3, 3),
    }
    stats = cache.stats()
    out["after"] = {
        "entries": stats.entries,
        "bytes": stats.nbytes,
        "budget": cache.max_bytes,
        "index_file_bytes": stats.file_bytes,
        "fds_before_ops": fds0,
        "fds_after_ops": fd_count(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
