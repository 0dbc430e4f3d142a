"""The cache directory: its sub-directories, temp paths, and clean-up after crashed processes.

Layout under ``root``::

    entries/<digest>/       the patched adapter files + cache_entry.json (the source of truth)
    tmp/<kind>.<pid>.<host>.<digest16>.<uuid>
                            builds in progress and entries being deleted
    locks/<name>.lock       flock files for cross-process single-flight; each exists only
                            while some process holds or waits for it (removed on release)
    owners/<owner>.lock     one per live process that holds leases: it keeps this file
                            flock'ed for its lifetime, so others can tell it is alive
    index.sqlite3           the index of entries, bytes and leases (rebuilt from entries/
                            if missing, corrupt or stale)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .entry import remove_tree

logger = logging.getLogger(__name__)

# Temp dirs of a live process are left alone unless they are this old; a build that
# takes longer than this would be deleted under its owner.
STALE_TMP_AGE_S = 3600.0

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (only for entries whose manifest is unreadable)."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclass(frozen=True)
class CacheLayout:
    """Where everything lives under one cache root; :meth:`prepare` creates and checks it."""

    root: Path

    @property
    def entries_dir(self) -> Path:
        return self.root / "entries"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def owners_dir(self) -> Path:
        return self.root / "owners"

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite3"

    def prepare(self) -> None:
        """Create the directories and prove they are writable; ConfigError saying what to fix."""
        fix = (
            "create it (or its parent) and make it writable by the server's user, or configure another cache directory"
        )
        subdirs = (self.entries_dir, self.tmp_dir, self.locks_dir, self.owners_dir)
        for d in (self.root, *subdirs):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"patched-adapter cache directory {str(d)!r} cannot be created ({exc}); {fix}"
                ) from exc
            if not d.is_dir():
                raise ConfigError(f"patched-adapter cache path {str(d)!r} exists but is not a directory; {fix}")
        # os.access can say yes on a read-only mount; a real write is the only proof.
        for d in (self.root, *subdirs):
            probe = d / f".write-probe.{os.getpid()}.{uuid.uuid4().hex}"
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(f"patched-adapter cache directory {str(d)!r} is not writable ({exc}); {fix}") from exc
        if os.stat(self.tmp_dir).st_dev != os.stat(self.entries_dir).st_dev:
            raise ConfigError(
                f"patched-adapter cache: {str(self.tmp_dir)!r} and {str(self.entries_dir)!r} are on different "
                "filesystems, so entries cannot be published atomically; do not mount over them separately"
            )

    def tmp_path(self, kind: str, digest: str) -> Path:
        # Owner pid and host are in the name so start-up clean-up can tell whether the
        # process that made it is gone.
        return self.tmp_dir / f"{kind}.{os.getpid()}.{HOST}.{digest[:16]}.{uuid.uuid4().hex[:12]}"

    def cleanup_stale_tmp(self) -> list[str]:
        """Delete temp dirs left by crashed processes; returns the names removed.

        Lists tmp/ once: called at start-up only (its size is the number of builds in
        progress plus leftovers of crashes, not the number of entries).
        """
        removed = []
        now = time.time()
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return removed
        for name in names:
            path = self.tmp_dir / name
            parts = name.split(".")
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            owner_dead = False
            if len(parts) == 5 and parts[1].isdigit() and parts[2] == HOST:
                pid = int(parts[1])
                owner_dead = pid != os.getpid() and not pid_alive(pid)
            if not (owner_dead or age > STALE_TMP_AGE_S):
                continue
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(name)
        if removed:
            logger.info(
                "patched-adapter cache %s: removed %d temp director%s left by stopped processes",
                self.root,
                len(removed),
                "y" if len(removed) == 1 else "ies",
            )
        return removed
