"""Entries this process has hashed, remembered by identity, so that using one again costs a stat.

Once this process hashed an entry's files, an unchanged signature (the identity, with
ctime, of the directory and each file: :func:`.entry.entry_signature`) means unchanged
bytes against every writer but root (ctime cannot be set). A signature taken within the
timestamp granularity of a write proves nothing (git's "racily clean" rule): it is not
remembered, and the entry is hashed again at its next use. On a file system whose ctime
cannot be trusted (network file systems: :func:`vllm_safelora.fsutil.ctime_trusted`)
nothing is remembered and every use hashes, as before. Bounded: ``max_entries``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .entry import CacheEntry, entry_signature, signature_racy

DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class _Hashed:
    entry: CacheEntry
    signature: tuple


class VerifiedEntries:
    def __init__(self, *, trusted: bool, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.trusted = trusted
        self.max_entries = max_entries
        self._known: OrderedDict[str, _Hashed] = OrderedDict()
        self._lock = threading.Lock()

    def unchanged(self, path: Path) -> tuple[CacheEntry, tuple] | None:
        """The entry at ``path`` and its signature, if hashed by this process and unchanged since."""
        key = str(path)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            return None
        signature = entry_signature(path)
        with self._lock:
            if signature != known.signature:
                self._known.pop(key, None)
                return None
            self._known.move_to_end(key)
        return known.entry, signature

    def remember(self, entry: CacheEntry, signature: tuple, hashed_at_ns: int) -> bool:
        """``entry``'s files were hashed from ``hashed_at_ns`` on; ``signature`` was taken before."""
        if not self.trusted or signature_racy(signature, hashed_at_ns):
            return False
        with self._lock:
            self._known[str(entry.path)] = _Hashed(entry, signature)
            self._known.move_to_end(str(entry.path))
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        return True

    def forget(self, path: Path) -> None:
        with self._lock:
            self._known.pop(str(path), None)

    def __len__(self) -> int:
        return len(self._known)
