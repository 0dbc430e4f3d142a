"""A small real file system for a cache that fills up or turns read-only: a tmpfs mount.

Needs root (CAP_SYS_ADMIN) and mount(8); where that is missing the tests using it skip,
saying why. ``fill()`` writes a filler file until the file system is full (ENOSPC), ``drain()``
removes it; ``read_only()`` / ``read_write()`` remount it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


class SmallFS:
    def __init__(self, path: Path, size_bytes: int):
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.filler = self.path / "filler.bin"

    def _mount(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", *args], capture_output=True, text=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def read_write(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True, capture_output=True)

    def fill(self) -> int:
        """Fill the file system to the last byte; returns the bytes written."""
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for block in (1 << 20, 1 << 12, 1):
                chunk = b"\0" * block
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def drain(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def small_fs(path: Path, size_bytes: int) -> Iterator[SmallFS]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` for the duration; skips the test if it cannot be mounted."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full / read-only cache needs a tmpfs mount, which needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield SmallFS(path, size_bytes)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True)
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
