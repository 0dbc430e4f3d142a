"""Cheap readings of this process's resources, for bound tests and the scale benchmark (Linux /proc)."""

from __future__ import annotations

import os


def fd_count() -> int:
    """Open file descriptors of this process (one listing of /proc/self/fd)."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
