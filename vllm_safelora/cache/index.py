"""The cache's index: one SQLite database (WAL mode) shared by every process using the cache.

It holds what would otherwise take a listing and a stat of every entry: each entry's
size, last use and state, the running byte total, and which processes hold a lease on
which entry. Every operation the service performs per adapter touches a handful of rows
through a primary key or the ``(last_use, digest)`` index, so its cost does not depend on
the number of entries. The directory ``entries/`` stays the source of truth: the index
is rebuilt from it at start-up when missing, corrupt or stale (see ``rebuild.py``).

Schema (``PRAGMA user_version`` = ``SCHEMA_VERSION``)::

    entries(digest PK, nbytes, last_use ns, state 'ready'|'evicting', origin)
        index entries_lru(last_use, digest)          -- LRU order for eviction
    totals(id=0, nbytes, entries)                    -- kept by triggers on entries
    owners(owner PK, host, pid, started ns)          -- processes that hold leases
    leases(digest, owner, since ns) PK(digest, owner), index leases_by_owner(owner)

Size: one row per entry on disk (bounded by the byte budget), one per (entry, process)
lease (bounded by what each process tracks), one per process holding leases.

``state = 'evicting'`` is set, in the same transaction that checks no lease exists, by
the process about to delete the entry; a lease is only taken while the state is
``'ready'``. So an entry is never deleted under a process that has just leased it.

Concurrency: one connection per cache object, used under a thread lock; writes are
``BEGIN IMMEDIATE`` transactions; other processes wait up to ``busy_timeout_s``.
WAL needs shared memory between the processes, so the cache directory must be on a
local filesystem: processes on one host share it; hosts do not (each its own cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConfigError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    digest   TEXT PRIMARY KEY,
    nbytes   INTEGER NOT NULL CHECK (nbytes >= 0),
    last_use INTEGER NOT NULL,
    state    TEXT NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'evicting')),
    origin   TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_use, digest);
CREATE TABLE IF NOT EXISTS totals (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    nbytes  INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, nbytes, entries) VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET nbytes = nbytes + NEW.nbytes, entries = entries + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET nbytes = nbytes - OLD.nbytes, entries = entries - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF nbytes ON entries BEGIN
    UPDATE totals SET nbytes = nbytes - OLD.nbytes + NEW.nbytes WHERE id = 0;
END;
CREATE TABLE IF NOT EXISTS owners (
    owner   TEXT PRIMARY KEY,
    host    TEXT NOT NULL,
    pid     INTEGER NOT NULL,
    started INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    digest TEXT NOT NULL,
    owner  TEXT NOT NULL,
    since  INTEGER NOT NULL,
    PRIMARY KEY (digest, owner)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_by_owner ON leases (owner);
"""

_NOT_LEASED = "NOT EXISTS (SELECT 1 FROM leases l WHERE l.digest = e.digest)"


class IndexUnusable(Exception):
    """The index file exists but cannot be used (corrupt, other schema); it is set aside and rebuilt."""


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


class CacheIndex:
    """See the module docstring. Thread-safe; one SQLite connection (3 fds: db, WAL, shm)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = float(busy_timeout_s)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    # ------------------------------------------------------------------ connection

    def open(self) -> str:
        """Open (creating or replacing as needed) and return why the index must be filled from
        entries/: ``"ok"`` (usable as it is), ``"missing"``, or ``"corrupt: <why>"``."""
        with self._lock:
            existed = self.path.exists() and self.path.stat().st_size > 0
            try:
                self._connect_and_check()
                return "ok" if existed else "missing"
            except (sqlite3.DatabaseError, IndexUnusable) as exc:
                why = str(exc) or type(exc).__name__
            self._set_aside(why)
            try:
                self._connect_and_check()
            except (sqlite3.DatabaseError, IndexUnusable) as exc:
                raise ConfigError(
                    f"patched-adapter cache index {self.path} cannot be created ({exc}); the cache directory must be "
                    "on a local filesystem where SQLite's WAL mode works (not NFS or SMB: give each host its own "
                    "cache_dir; entries are content-addressed, so replicas still agree)"
                ) from exc
            return f"corrupt: {why}"

    def _connect_and_check(self) -> None:
        self.close()
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise IndexUnusable(f"cannot switch to WAL mode (got {mode!r})")
            # NORMAL: a power cut may lose the last transactions, never corrupt the file; the
            # index is rebuilt from entries/ anyway, so durability per write is not needed.
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(_SCHEMA):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            elif version != SCHEMA_VERSION:
                raise IndexUnusable(f"schema version {version}, this vllm-safelora uses {SCHEMA_VERSION}")
            else:
                check = conn.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise IndexUnusable(f"quick_check says {check!r}")
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"entries", "totals", "owners", "leases"} <= tables:
                    raise IndexUnusable(f"tables missing (has {sorted(tables)})")
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        logger.warning(
            "patched-adapter cache index %s is unusable (%s); moved it to %s and rebuilding it from the entries "
            "directory. Delete the old file once you no longer need it for diagnosis",
            self.path, why, aside,
        )
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connection without closing it (SQLite must not
        close a connection across fork); a new one is opened if the child uses the index."""
        _ABANDONED.append(self._conn)
        self._conn = None
        self._lock = threading.RLock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                self.forget_after_fork()
            self._connect_and_check()
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()

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
                f"UPDATE entries SET state = 'evicting' WHERE digest = ? AND state = 'ready' AND last_use = ? "
                f"AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.digest = ?)",
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


# Connections inherited across fork: kept referenced, never closed, in the child.
_ABANDONED: list = []


def _statements(script: str) -> list[str]:
    """Split the schema script into statements (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            out.append(joined)
            buf = []
    return out
