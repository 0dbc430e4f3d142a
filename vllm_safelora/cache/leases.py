"""Leases: "this process may still hand this entry to vLLM; do not delete it".

Model. A process holds a lease on an entry while something in it may still make vLLM
read the entry: the service takes one per adapter it tracks (the entry paths it handed
out and the names it lists as loaded, both bounded LRU maps) and gives it back when the
adapter is unloaded or drops out of those maps. In memory a lease is a count per entry;
in the shared index it is one row per (entry, process). Eviction never deletes an entry
that has a lease row.

Owners. A process registers once, lazily, as ``<host>.<pid>.<random>`` and keeps
``owners/<owner>.lock`` flock'ed for its lifetime: the only file descriptor leases ever
use, whatever the number of entries. Another process tells a live owner from a dead one
by trying to flock that file (it works across PID namespaces, where pids do not), and
drops a dead owner's rows when it sweeps (:meth:`Leases.sweep_dead_owners`).

Releases are deferred: :meth:`Leases.release` only updates memory (it may run on
vLLM's event loop), and :meth:`Leases.flush`, called by the cache's next operation,
deletes the rows. Until then the entry is simply protected a little longer.

Bounds: rows and counts of this process <= the distinct entries the service tracks;
fds: one; owners rows: live processes plus dead ones not yet swept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import fcntl

from .faults import storage_fault
from .index import CacheIndex
from .layout import HOST

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 10.0


def owner_alive(owners_dir: Path, owner: str) -> bool:
    """Does the process ``owner`` still hold its owner file? (False also removes a dead one's file.)"""
    path = owners_dir / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return False
    finally:
        os.close(fd)


class Leases:
    """This process's leases on one cache's entries. Thread-safe."""

    def __init__(self, index: CacheIndex, owners_dir: Path):
        self.index = index
        self.owners_dir = Path(owners_dir)
        self._counts: dict[str, int] = {}
        self._pending: set[str] = set()  # count dropped to 0; row not deleted yet
        self._unrecorded: set[str] = set()  # held while the index could not be written (faults.py); row not written yet
        self._owner: str | None = None
        self._owner_fd: int | None = None
        # _lock guards the counts and is never held during I/O, so release() and a lease on
        # an entry already held never wait for the database (they may run on vLLM's event
        # loop). _io_lock orders this process's lease writes: a flush never deletes a row
        # while another thread is taking a fresh lease on the same entry.
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ owner

    @property
    def owner(self) -> str:
        with self._io_lock:
            return self._ensure_owner()

    def _ensure_owner(self) -> str:
        """Register this process as a lease owner once (call with ``_io_lock`` held)."""
        if self._owner is None:
            owner = f"{HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
            fd = os.open(self.owners_dir / f"{owner}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.index.register_owner(owner, HOST, os.getpid())
            except BaseException:
                os.close(fd)
                raise
            self._owner, self._owner_fd = owner, fd
        return self._owner

    # ------------------------------------------------------------------ counting

    def try_acquire(self, digest: str) -> bool:
        """Lease the entry unless another process is evicting it right now (False)."""
        with self._lock:
            if self._counts.get(digest, 0) > 0:
                # Our row exists and no flush will touch it: nobody can be evicting the
                # entry, so no index write is needed.
                self._counts[digest] += 1
                return True
        with self._io_lock:
            try:
                if not self.index.try_lease(digest, self._ensure_owner()):
                    return False
            except Exception as exc:
                if storage_fault(exc) is None:
                    raise
                # Full or read-only: nobody can mark the entry for eviction either (that is a
                # write too), so holding it in memory is safe; the row is written by a later flush.
                self._unrecorded.add(digest)
            self._add(digest)
            return True

    def acquire(self, digest: str) -> None:
        """Lease the entry; the caller holds its key lock (nobody can be evicting it)."""
        with self._io_lock:
            self.index.add_lease(digest, self._ensure_owner())
            self._add(digest)

    def _add(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] = self._counts.get(digest, 0) + 1
            self._pending.discard(digest)

    def release(self, digest: str) -> None:
        """Give back one lease (memory only; the row goes at the next :meth:`flush`)."""
        with self._lock:
            n = self._counts.get(digest, 0)
            if n <= 0:
                logger.debug("patched-adapter cache: release of %s, which this process does not lease", digest[:16])
                return
            if n == 1:
                del self._counts[digest]
                self._pending.add(digest)
            else:
                self._counts[digest] = n - 1

    def flush(self) -> int:
        """Delete the rows of leases given back since the last flush; returns how many."""
        with self._io_lock:
            self._record_unrecorded()
            with self._lock:
                if not self._pending or self._owner is None:
                    return 0
                # Counted again since (by the fast path) means still held: keep those rows.
                done = [d for d in self._pending if d not in self._counts]
                self._pending.clear()
            try:
                self.index.drop_leases(done, self._owner)
            except Exception as exc:
                if storage_fault(exc) is None:
                    raise
                with self._lock:  # tried again at the next flush; until then the entries stay protected
                    self._pending.update(done)
                return 0
            return len(done)

    def _record_unrecorded(self) -> None:
        """Write the rows of leases taken while the index could not be written (call with ``_io_lock``)."""
        if not self._unrecorded:
            return
        with self._lock:
            waiting = [d for d in self._unrecorded if self._counts.get(d, 0) > 0]
            self._unrecorded.clear()
        try:
            owner = self._ensure_owner()
            while waiting:
                self.index.add_lease(waiting[-1], owner)
                waiting.pop()
        except Exception as exc:
            if storage_fault(exc) is None:
                raise
            with self._lock:
                self._unrecorded.update(waiting)

    def held(self) -> dict[str, int]:
        """Entry digest -> number of leases this process holds on it."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ other processes

    def sweep_dead_owners(self, min_interval_s: float = SWEEP_INTERVAL_S) -> list[str]:
        """Drop the leases of processes that are gone; at most once per ``min_interval_s``.
        Cost: one flock probe per registered process."""
        now = time.monotonic()
        if now - self._last_sweep < min_interval_s:
            return []
        self._last_sweep = now
        mine = self._owner
        dead = []
        for owner in self.index.owners():
            if owner != mine and not owner_alive(self.owners_dir, owner):
                n = self.index.drop_owner(owner)
                dead.append(owner)
                logger.info(
                    "patched-adapter cache: process %s has stopped; dropped its %d lease%s",
                    owner,
                    n,
                    "" if n == 1 else "s",
                )
        return dead

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Give back every lease and the owner file (the process keeps running)."""
        with self._io_lock, self._lock:
            owner, fd = self._owner, self._owner_fd
            self._owner = self._owner_fd = None
            self._counts.clear()
            self._pending.clear()
        if owner is not None:
            with contextlib.suppress(Exception):
                self.index.drop_owner(owner)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.owners_dir / f"{owner}.lock")
            os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's leases are not ours. Closing our copy of the owner
        fd does not release the parent's flock (it still holds its own reference)."""
        if self._owner_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
        self._owner = self._owner_fd = None
        self._counts = {}
        self._pending = set()
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
