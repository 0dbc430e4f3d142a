"""Keeping the cache within its byte budget: least-recently-used eviction through the index.

After every miss, and after leases are given back, least-recently-used entries are
deleted until the total is within ``max_bytes``. Entries some process leases (vLLM may
still read them), entries another process is working on, and the entry just built are
never deleted, so the total can exceed ``max_bytes`` by those. The walk follows the
index's LRU order from the oldest entry and stops as soon as the cache is within budget:
its cost is the entries deleted plus the leased/busy ones stepped over, not the cache's size.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from collections.abc import Callable

from .index import CacheIndex
from .leases import Leases
from .locks import KeyLocks

logger = logging.getLogger(__name__)

_EVICT_PAGE = 64
_OVER_BUDGET_LOG_INTERVAL_S = 60.0


class Evictor:
    """Deletes least-recently-used entries of one cache; thread-safe (one pass at a time).

    ``discard(path)`` removes an entry directory (False if it was already gone); ``root``
    is only named in messages.
    """

    def __init__(
        self,
        index: CacheIndex,
        locks: KeyLocks,
        leases: Leases,
        entries_dir: Path,
        discard: Callable[[Path], bool],
        root: Path,
    ):
        self.index = index
        self.locks = locks
        self.leases = leases
        self.entries_dir = entries_dir
        self._discard = discard
        self.root = root
        self._guard = threading.Lock()
        self._last_over_budget_log = 0.0

    def evict_to_budget(self, max_bytes: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete least-recently-used entries until the total is within ``max_bytes``.

        ``protect`` holds digests that must stay (e.g. the entry just built). Leased
        entries and entries whose lock another thread or process holds are skipped.
        Returns the digests removed, oldest first.
        """
        evicted: list[str] = []
        with self._guard:
            total = self.index.total_bytes()
            if total <= max_bytes:
                return evicted
            self.leases.sweep_dead_owners()
            cursor: tuple[int, str] = (-1, "")
            # Entries used during the pass move behind the cursor and may be met again;
            # this caps one pass at about one visit per entry whatever happens meanwhile.
            visits_left = self.index.entry_count() + _EVICT_PAGE
            while total > max_bytes and visits_left > 0:
                page = self.index.lru_page(cursor, _EVICT_PAGE)
                if not page:
                    break
                visits_left -= len(page)
                for row in page:
                    cursor = (row.last_use, row.digest)
                    if row.digest in protect:
                        continue
                    if self._evict_one(row.digest, row.last_use, row.nbytes, max_bytes):
                        evicted.append(row.digest)
                    total = self.index.total_bytes()
                    if total <= max_bytes:
                        break
            if total > max_bytes:
                self._log_over_budget(total, max_bytes)
        return evicted

    def _evict_one(self, digest: str, last_use: int, nbytes: int, max_bytes: int) -> bool:
        with self.locks.hold(digest, blocking=False) as got:
            # Skip it if busy, leased or used since we read its row (begin_eviction checks).
            if not got or not self.index.begin_eviction(digest, last_use):
                return False
            try:
                removed = self._discard(self.entries_dir / digest)
            except OSError as exc:
                # Keep serving (the entry that was just built is fine); the operator must fix the disk.
                self.index.abort_eviction(digest)
                logger.error(
                    "patched-adapter cache: could not delete entry %s to stay within budget (%s); it stays. Check "
                    "permissions and the filesystem under %s",
                    digest[:16],
                    exc,
                    self.root,
                )
                return False
            self.index.remove(digest)
        if removed:
            logger.info(
                "patched-adapter cache: evicted least-recently-used entry %s (%d bytes) to stay within %d bytes; "
                "it will be rebuilt if requested again",
                digest[:16],
                nbytes,
                max_bytes,
            )
        return removed

    def _log_over_budget(self, total: int, max_bytes: int) -> None:
        now = time.monotonic()
        if now - self._last_over_budget_log < _OVER_BUDGET_LOG_INTERVAL_S:
            return
        self._last_over_budget_log = now
        stats = self.index.stats()
        logger.warning(
            "patched-adapter cache %s holds %d bytes, over its %d-byte limit, because the remaining entries are "
            "leased (%d leases by %d processes: vLLM may still read them), being worked on, or were just created; "
            "raise cache_max_bytes or lower max_tracked_adapters if this persists",
            self.root,
            total,
            max_bytes,
            stats.leases,
            stats.owners,
        )
