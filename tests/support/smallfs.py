"""A small real file system for a cache that fills up or turns read-only: a tmpfs mount.

Needs root (CAP_SYS_ADMIN) and mount(8); where that is missing the tests using it skip,
saying why. ``fill()`` writes a filler file until the file system is full (ENOSPC), ``drain()``
removes it. (A read-only remount is refused by the kernel while a live cache holds files
open for writing, so read-only is not simulated here.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from collections.abc import Iterator

import pytest


class SmallFS:
    def __init__(self, path: Path, size_bytes: int):
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.filler = self.path / "filler.bin"

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


def mount_small_fs(path: Path, size_bytes: int) -> SmallFS | str:
    """A tmpfs of ``size_bytes`` mounted at ``path``, or why it cannot be (the caller decides to skip)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "a full cache needs a tmpfs mount, which needs root"
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})"
    return SmallFS(path, size_bytes)


def unmount(fs: SmallFS) -> None:
    subprocess.run(["umount", "-l", str(fs.path)], capture_output=True)


@contextlib.contextmanager
def small_fs(path: Path, size_bytes: int) -> Iterator[SmallFS]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` for the duration; skips the test if it cannot be mounted."""
    fs = mount_small_fs(path, size_bytes)
    if isinstance(fs, str):
        pytest.skip(fs)
    try:
        yield fs
    finally:
        unmount(fs)
