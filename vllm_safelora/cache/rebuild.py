"""Bring the index in line with entries/ at start-up (the directory is the source of truth).

When: every time a cache is opened, under the cross-process ``index`` lock.
What counts as stale: the set of entry directories differs from the set of indexed
digests. That happens when entries are added or removed by something that does not
write the index (an older vllm-safelora, an operator, a restored backup, the worker
guard discarding an altered entry, a crash between a publish and its index write).
One listing of entries/ (names only) and one read of the indexed digests find it:
directories without a row get one (size from the manifest, last use from the
manifest's mtime, which every use also touches), rows without a directory go.
A missing or corrupt index is the case where every directory lacks a row.

Differences that appear while serving are repaired as they are met, never by listing:
a hit on an unindexed entry adds its row, a row whose directory vanished is removed by
the eviction that picks it, a rebuilt entry overwrites its row's size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .entry import HEX64, MANIFEST_NAME, CorruptEntry, read_entry_manifest
from .index import CacheIndex
from .layout import dir_bytes

logger = logging.getLogger(__name__)

_BATCH = 2000


@dataclass(frozen=True)
class ReconcileReport:
    """What start-up found and did."""

    index_state: str  # "ok" | "missing" | "corrupt: <why>" (from CacheIndex.open)
    on_disk: int  # entry directories listed
    added: int  # rows made from directories the index did not know
    removed: int  # rows whose directory was gone
    unreadable: int  # added entries whose manifest could not be read (evicted first)
    seconds: float

    @property
    def stale(self) -> bool:
        return bool(self.added or self.removed)


def row_from_directory(path: Path) -> tuple[str, int, int, bool]:
    """(digest, nbytes, last_use_ns, readable) of an entry directory, from its manifest alone.

    An entry whose manifest cannot be read gets its size by walking it and last use 0,
    so it is the first to go; it would be discarded on first use anyway.
    """
    try:
        _key, files, _created, manifest_size = read_entry_manifest(path)
        last_use = os.stat(path / MANIFEST_NAME).st_mtime_ns
        return path.name, manifest_size + sum(m["size"] for m in files.values()), last_use, True
    except (CorruptEntry, OSError):
        return path.name, dir_bytes(path), 0, False


def reconcile(index: CacheIndex, entries_dir: Path, index_state: str) -> ReconcileReport:
    start = time.perf_counter()
    on_disk = {name for name in os.listdir(entries_dir) if HEX64.fullmatch(name)}
    known = index.digests()
    added = unreadable = 0
    batch: list[tuple[str, int, int]] = []
    for digest in sorted(on_disk - known):
        name, nbytes, last_use, readable = row_from_directory(entries_dir / digest)
        unreadable += not readable
        batch.append((name, nbytes, last_use))
        if len(batch) >= _BATCH:
            added += index.add_rows(batch)
            batch = []
    added += index.add_rows(batch)
    # Another live process may have published one of these since the listing: recheck.
    gone = [d for d in known - on_disk if not os.path.lexists(entries_dir / d)]
    removed = index.remove_rows(gone) if gone else 0
    report = ReconcileReport(
        index_state=index_state,
        on_disk=len(on_disk),
        added=added,
        removed=removed,
        unreadable=unreadable,
        seconds=time.perf_counter() - start,
    )
    if index_state != "ok" or report.stale:
        logger.info(
            "patched-adapter cache %s: index %s; %d entries on disk, %d rows added, %d removed%s in %.2fs",
            entries_dir.parent,
            index_state,
            report.on_disk,
            added,
            removed,
            f" ({unreadable} with unreadable manifests, to be evicted first)" if unreadable else "",
            report.seconds,
        )
    return report
