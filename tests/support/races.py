"""A tenant racing the server: ``renameat2(RENAME_EXCHANGE)`` swapping a directory and a symlink.

The exchange is atomic, so every lookup of the name sees either the directory or the link,
never neither: exactly what defeats ``realpath`` + check + ``open``. Used by the in-process
tests (tests/test_confined.py) and the live ones (tests/hardening/test_races.py).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from pathlib import Path

RENAME_EXCHANGE = 2
# renameat2's syscall number where glibc has no wrapper for it (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap the directory entries ``a`` and ``b`` (any types)."""
    fa, fb = os.fsencode(str(a)), os.fsencode(str(b))
    if hasattr(_libc, "renameat2"):
        rc = _libc.renameat2(_AT_FDCWD, fa, _AT_FDCWD, fb, RENAME_EXCHANGE)
    else:
        rc = _libc.syscall(_SYS_RENAMEAT2[platform.machine()], _AT_FDCWD, fa, _AT_FDCWD, fb, RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


class Swapper:
    """Swaps ``a`` and ``b`` in a tight loop on a thread until stopped (``with Swapper(a, b):``).

    ``period_s`` > 0 sleeps between swaps (a live server needs the window open long
    enough to land inside a preparation, not a swap storm that starves it)."""

    def __init__(self, a: Path, b: Path, period_s: float = 0.0):
        self.a, self.b, self.period_s = Path(a), Path(b), period_s
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            exchange(self.a, self.b)
            self.swaps += 1
            if self.period_s:
                time.sleep(self.period_s)

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.swaps % 2:  # leave both names as they were
            exchange(self.a, self.b)
