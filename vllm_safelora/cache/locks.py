"""Per-key single-flight across threads (a lock per key) and processes (flock on a lock file).

Bounds: a key's thread lock exists only while some thread uses it, and its lock file
``locks/<key>.lock`` only while some process holds or waits for it: the holder unlinks
the file before releasing, and whoever then gets the flock on the unlinked inode sees
that the path no longer names its file and starts again on a fresh one. So neither
memory nor the number of files in ``locks/`` grows with the number of keys ever seen,
and no file descriptor outlives the ``with`` block that opened it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from collections.abc import Iterator

import fcntl

_POLL_S = 0.02


class KeyLocks:
    """``with locks.hold(key):`` is exclusive per key across threads and processes sharing ``locks_dir``."""

    def __init__(self, locks_dir: Path, timeout_s: float, what: str = "patched-adapter cache"):
        self.locks_dir = Path(locks_dir)
        self.timeout_s = float(timeout_s)
        self.what = what
        # key -> [lock, number of threads using it]; dropped when unused.
        self._slots: dict[str, list] = {}
        self._guard = threading.Lock()

    def in_use(self) -> int:
        """Keys some thread of this process holds or waits for (for tests and diagnostics)."""
        with self._guard:
            return len(self._slots)

    @contextlib.contextmanager
    def hold(self, key: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the key's thread lock, then its flock. Yields False if not ``blocking`` and
        either is busy; raises TimeoutError after ``timeout_s``."""
        with self._guard:
            slot = self._slots.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            lock: threading.Lock = slot[0]
            got = lock.acquire(timeout=self.timeout_s) if blocking else lock.acquire(blocking=False)
            if not got:
                if not blocking:
                    yield False
                    return
                raise TimeoutError(self._timeout_message(key))
            try:
                fd = self._flock(key, blocking)
                if fd is None:
                    yield False
                    return
                try:
                    yield True
                finally:
                    self._release(key, fd)
            finally:
                lock.release()
        finally:
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._slots[key]

    def _path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    def _flock(self, key: str, blocking: bool) -> int | None:
        """An fd holding the flock on the file ``locks/<key>.lock`` names right now, or None."""
        path = self._path(key)
        deadline = time.monotonic() + self.timeout_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while True:  # poll rather than block so the timeout is honoured
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking:
                            os.close(fd)
                            return None
                        if time.monotonic() >= deadline:
                            raise TimeoutError(self._timeout_message(key)) from None
                        time.sleep(_POLL_S)
                # The previous holder may have unlinked the file while we waited: a lock
                # on that orphaned inode excludes nobody. Only the file the path names counts.
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # orphaned inode: try again on the fresh file

    def _release(self, key: str, fd: int) -> None:
        # Unlink while still holding the flock, so nobody can lock this inode and believe it current.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _timeout_message(self, key: object) -> str:
        return (
            f"{self.what} {self.locks_dir.parent}: waited {self.timeout_s:.0f}s for another thread or process "
            f"working on {str(key)[:16]}; it may be stuck. Check for hung server processes"
        )
