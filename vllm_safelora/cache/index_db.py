"""The index's SQLite file: its schema, a WAL connection, setting aside a corrupt file.

Schema (``PRAGMA user_version`` = ``SCHEMA_VERSION``)::

    entries(digest PK, nbytes, last_use ns, state 'ready'|'evicting', origin)
        index entries_lru(last_use, digest)          -- LRU order for eviction
    totals(id=0, nbytes, entries)                    -- kept by triggers on entries
    owners(owner PK, host, pid, started ns)          -- processes that hold leases
    leases(digest, owner, since ns) PK(digest, owner), index leases_by_owner(owner)

Concurrency: one connection per cache object, used under a thread lock; writes are
``BEGIN IMMEDIATE`` transactions; other processes wait up to ``busy_timeout_s``.
WAL needs shared memory between the processes, so the cache directory must be on a
local filesystem: processes on one host share it; hosts do not (each its own cache).
A forked child never uses (or closes) its parent's connection: it opens its own.

The queries are in ``index.py`` (:class:`~.index.CacheIndex`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from collections.abc import Iterator

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


# Added after schema version 1 and created on every open, so index files written before
# gain it in place: uploads already hashed, by the identity of their files (the identity rule
# in vllm_safelora.fsutil), so a cache hit on an unchanged upload needs no read.
_UPLOADS = """
CREATE TABLE IF NOT EXISTS uploads (
    identity     TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    last_use     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uploads_lru ON uploads (last_use);
"""


class IndexUnusable(Exception):
    """The index file exists but cannot be used (corrupt, other schema); it is set aside and rebuilt."""


class IndexDatabase:
    """One SQLite connection (3 fds: db, WAL, shm) to the index file, thread-safe; opened by :meth:`open`."""

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
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
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
            for statement in _statements(_UPLOADS):
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        logger.warning(
            "patched-adapter cache index %s is unusable (%s); moved it to %s and rebuilding it from the entries "
            "directory. Delete the old file once you no longer need it for diagnosis",
            self.path,
            why,
            aside,
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
                conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (disk full) leaves the transaction open: without this
                # rollback every later write on the connection fails, after space is freed too.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()


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
