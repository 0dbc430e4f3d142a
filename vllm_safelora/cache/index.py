"""The cache's index: one SQLite database (WAL mode) shared by every process using the cache.

It holds what would otherwise take a listing and a stat of every entry: each entry's
size, last use and state, the running byte total, and which processes hold a lease on
which entry. Every operation the service performs per adapter touches a handful of rows
through a primary key or the ``(last_use, digest)`` index, so its cost does not depend on
the number of entries. The directory ``entries/`` stays the source of truth: the index
is rebuilt from it at start-up when missing, corrupt or stale (see ``rebuild.py``).
The file itself (schema, connection, concurrency) is ``index_db.py``; this module holds
the queries.

Size: one row per entry on disk (bounded by the byte budget), one per (entry, process)
lease (bounded by what each process tracks), one per process holding leases, and at most
``MAX_UPLOADS`` rows of uploads known by identity (least recently used dropped first).

``state = 'evicting'`` is set, in the same transaction that checks no lease exists, by
the process about to delete the entry; a lease is only taken while the state is
``'ready'``. So an entry is never deleted under a process that has just leased it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable

from .index_db import IndexDatabase

_NOT_LEASED = "NOT EXISTS (SELECT 1 FROM leases l WHERE l.digest = e.digest)"
MAX_UPLOADS = 100_000
_TRIM_EVERY = 256  # remembered uploads between two trims of the table


@dataclass(frozen=True)
class EntryRow:
    digest: str
    nbytes: int
    last_use: int  # unix time in ns


@dataclass(frozen=True)
class IndexStats:
    """A cheap snapshot (a few single-row reads) for metrics, status pages and benchmarks."""

    entries: int
    nbytes: int
    leases: int  # lease rows of every process, this one included
    owners: int  # processes registered as lease holders (dead ones until swept)
    file_bytes: int  # index.sqlite3 + its WAL on disk


class CacheIndex(IndexDatabase):
    """See the module docstring. Thread-safe; one SQLite connection (index_db.py)."""

    # ------------------------------------------------------------------ uploads by identity

    def upload_hash(self, identity: str) -> str | None:
        """The content hash of the upload whose files had ``identity`` when it was read, or None."""
        rows = self._read("SELECT content_hash FROM uploads WHERE identity = ?", (identity,))
        return rows[0][0] if rows else None

    def remember_upload(self, identity: str, content_hash: str) -> None:
        now = time.time_ns()
        with self._write() as db:
            db.execute(
                "INSERT INTO uploads (identity, content_hash, last_use) VALUES (?, ?, ?) "
                "ON CONFLICT (identity) DO UPDATE SET content_hash = excluded.content_hash, last_use = excluded.last_use",
                (identity, content_hash, now),
            )
        self._uploads_added = getattr(self, "_uploads_added", 0) + 1
        if self._uploads_added % _TRIM_EVERY == 0:
            self.trim_uploads(MAX_UPLOADS)

    def trim_uploads(self, keep: int) -> int:
        """Keep the ``keep`` most recently used rows; returns how many were dropped."""
        with self._write() as db:
            return db.execute(
                "DELETE FROM uploads WHERE identity IN (SELECT identity FROM uploads ORDER BY last_use DESC "
                "LIMIT -1 OFFSET ?)",
                (keep,),
            ).rowcount

    def upload_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM uploads")[0][0]

    # ------------------------------------------------------------------ entries

    def record_use(self, digest: str, nbytes: int, *, origin: str | None = None, now_ns: int | None = None) -> None:
        """The entry was just used (and is ``nbytes`` on disk): add or refresh its row.
        Leaves the state alone: an entry being evicted stays so."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._write() as db:
            db.execute(
                "INSERT INTO entries (digest, nbytes, last_use, origin) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET last_use = excluded.last_use, nbytes = excluded.nbytes, "
                "origin = coalesce(excluded.origin, origin)",
                (digest, nbytes, now, origin),
            )

    def publish(self, digest: str, nbytes: int, *, origin: str | None = None) -> None:
        """The entry is on disk and verified, and the caller holds its key lock: mark it ready
        (this also clears an ``'evicting'`` left by an evictor that crashed)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO entries (digest, nbytes, last_use, origin) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET last_use = excluded.last_use, nbytes = excluded.nbytes, "
                "state = 'ready', origin = coalesce(excluded.origin, origin)",
                (digest, nbytes, time.time_ns(), origin),
            )

    def set_last_use(self, digest: str, last_use_ns: int) -> None:
        """Set an entry's last use (tests and tools: e.g. to age entries)."""
        with self._write() as db:
            db.execute("UPDATE entries SET last_use = ? WHERE digest = ?", (last_use_ns, digest))

    def remove(self, digest: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM entries WHERE digest = ?", (digest,))

    def get(self, digest: str) -> tuple[int, int, str, str | None] | None:
        """(nbytes, last_use, state, origin) of one entry, or None."""
        rows = self._read("SELECT nbytes, last_use, state, origin FROM entries WHERE digest = ?", (digest,))
        return rows[0] if rows else None

    def origin(self, digest: str) -> str | None:
        """Where the uploaded adapter of this entry was last read from (a path or hub name)."""
        row = self.get(digest)
        return row[3] if row else None

    def lru_page(self, after: tuple[int, str], limit: int) -> list[EntryRow]:
        """Up to ``limit`` ready, unleased entries in LRU order, strictly after ``after`` =
        (last_use, digest). Cost: ``limit`` plus the leased rows it steps over."""
        rows = self._read(
            f"SELECT digest, nbytes, last_use FROM entries e WHERE state = 'ready' AND (last_use, digest) > (?, ?) "
            f"AND {_NOT_LEASED} ORDER BY last_use, digest LIMIT ?",
            (after[0], after[1], limit),
        )
        return [EntryRow(*r) for r in rows]

    def begin_eviction(self, digest: str, last_use: int) -> bool:
        """Mark the entry as being evicted if it is ready, unleased and unused since ``last_use``.
        Call with the entry's key lock held; then delete the directory and :meth:`remove` the row."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE entries SET state = 'evicting' WHERE digest = ? AND state = 'ready' AND last_use = ? "
                "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.digest = ?)",
                (digest, last_use, digest),
            )
            return cur.rowcount == 1

    def abort_eviction(self, digest: str) -> None:
        """The entry could not be deleted: ready again, its last use unchanged."""
        with self._write() as db:
            db.execute("UPDATE entries SET state = 'ready' WHERE digest = ? AND state = 'evicting'", (digest,))

    def entry_count(self) -> int:
        return self._read("SELECT entries FROM totals WHERE id = 0")[0][0]

    def evicting(self) -> list[str]:
        """Entries left marked 'evicting' (an evictor died half-way; repaired at start-up)."""
        return [r[0] for r in self._read("SELECT digest FROM entries WHERE state = 'evicting'")]

    def total_bytes(self) -> int:
        return self._read("SELECT nbytes FROM totals WHERE id = 0")[0][0]

    def stats(self) -> IndexStats:
        nbytes, entries = self._read("SELECT nbytes, entries FROM totals WHERE id = 0")[0]
        leases = self._read("SELECT count(*) FROM leases")[0][0]
        owners = self._read("SELECT count(*) FROM owners")[0][0]
        file_bytes = 0
        for p in (self.path, Path(f"{self.path}-wal")):
            with contextlib.suppress(OSError):
                file_bytes += p.stat().st_size
        return IndexStats(entries=entries, nbytes=nbytes, leases=leases, owners=owners, file_bytes=file_bytes)

    # ------------------------------------------------------------------ start-up rebuild

    def digests(self) -> set[str]:
        """Every indexed digest (start-up reconciliation only: O(number of entries))."""
        return {r[0] for r in self._read("SELECT digest FROM entries")}

    def add_rows(self, rows: Iterable[tuple[str, int, int]]) -> int:
        """Insert (digest, nbytes, last_use) rows found on disk; rows already present are kept."""
        with self._write() as db:
            cur = db.executemany(
                "INSERT INTO entries (digest, nbytes, last_use) VALUES (?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                list(rows),
            )
            return cur.rowcount

    def remove_rows(self, digests: Iterable[str]) -> int:
        with self._write() as db:
            cur = db.executemany("DELETE FROM entries WHERE digest = ?", [(d,) for d in digests])
            return cur.rowcount

    # ------------------------------------------------------------------ leases

    def register_owner(self, owner: str, host: str, pid: int) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO owners (owner, host, pid, started) VALUES (?, ?, ?, ?) ON CONFLICT (owner) DO NOTHING",
                (owner, host, pid, time.time_ns()),
            )

    def owners(self) -> list[str]:
        return [r[0] for r in self._read("SELECT owner FROM owners")]

    def drop_owner(self, owner: str) -> int:
        """Forget a process and every lease it held; returns the leases dropped."""
        with self._write() as db:
            n = db.execute("DELETE FROM leases WHERE owner = ?", (owner,)).rowcount
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))
            return n

    def try_lease(self, digest: str, owner: str) -> bool:
        """Lease the entry for ``owner`` and record its use, unless it is being evicted (False)."""
        now = time.time_ns()
        with self._write() as db:
            row = db.execute("SELECT state FROM entries WHERE digest = ?", (digest,)).fetchone()
            if row is not None and row[0] != "ready":
                return False
            db.execute(
                "INSERT INTO leases (digest, owner, since) VALUES (?, ?, ?) ON CONFLICT (digest, owner) DO NOTHING",
                (digest, owner, now),
            )
            db.execute("UPDATE entries SET last_use = ? WHERE digest = ?", (now, digest))
            return True

    def add_lease(self, digest: str, owner: str) -> None:
        """Lease whatever the state (the caller holds the entry's key lock, so nobody is evicting it)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO leases (digest, owner, since) VALUES (?, ?, ?) ON CONFLICT (digest, owner) DO NOTHING",
                (digest, owner, time.time_ns()),
            )

    def drop_leases(self, digests: Iterable[str], owner: str) -> None:
        """Release ``owner``'s leases; each entry counts as used until now (LRU by last real use)."""
        now = time.time_ns()
        with self._write() as db:
            for digest in digests:
                db.execute("DELETE FROM leases WHERE digest = ? AND owner = ?", (digest, owner))
                db.execute("UPDATE entries SET last_use = max(last_use, ?) WHERE digest = ?", (now, digest))

    def leased(self, digest: str) -> list[str]:
        """Owners holding a lease on the entry."""
        return [r[0] for r in self._read("SELECT owner FROM leases WHERE digest = ?", (digest,))]
