"""What a vLLM worker may hand its adapter loader: only intact entries of one cache.

The first time this process loads an entry, it must hold exactly its manifest's files
at their recorded sizes; the small files are hashed (blake3) against the manifest, and
the weights file is read once, hashed, and given to the caller's ``read`` as those very
bytes (the integration makes vLLM's safetensors reader use them, so nothing can be
swapped in between). Later loads of the same entry (vLLM re-reads it after evicting it
from its own LRU) check its signature instead (:mod:`.verified`: identity with ctime,
unchanged since this process hashed it) and read the weights into private memory
without hashing them. Either way the signature must be the same after the read. An
altered entry is removed (moved to a temp path of this cache's layout, so a crash
mid-removal is cleaned up like any other leftover) and rebuilt by the front end from the
tenant's upload. Imports no vLLM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable

from ..adapters import WEIGHTS_FILE
from ..fsutil import ctime_trusted
from .entry import CorruptEntry, discard_entry, entry_path_in, entry_signature, read_verified, verify_entry
from .layout import CacheLayout
from .verified import VerifiedEntries

T = TypeVar("T")

# The weights are hashed by the one read that hands them to vLLM, not by verify_entry.
_HASHED_BY_READ = frozenset({WEIGHTS_FILE})


class EntryRefused(Exception):
    """A worker must not load this path. ``removed``: it was an altered entry, now removed."""

    def __init__(self, problem: str, entry: Path | None, removed: bool):
        super().__init__(problem)
        self.problem = problem
        self.entry = entry
        self.removed = removed


class WorkerGuard:
    def __init__(self, cache_dir: Path):
        self.layout = CacheLayout(Path(cache_dir))
        trusted, self.filesystem = ctime_trusted(self.layout.root)
        self.verified = VerifiedEntries(trusted=trusted)

    def entry_for(self, lora_path: str | None) -> Path | None:
        """The entry directory ``lora_path`` names in this cache, or None."""
        if not lora_path or not os.path.isabs(lora_path):
            return None
        return entry_path_in(lora_path, self.layout.entries_dir)

    def load(self, lora_path: str | None, read: Callable[[Path, bytes], T]) -> tuple[Path, T]:
        """``read(weights_path, verified_weight_bytes)`` for an intact entry; EntryRefused otherwise.

        ``read`` may raise CorruptEntry (e.g. its loader did not use the verified bytes):
        the entry then counts as altered.
        """
        entry = self.entry_for(lora_path)
        if entry is None:
            raise EntryRefused("it is no entry of that cache, so it was never projected", None, removed=False)
        try:
            known = self.verified.unchanged(entry)
            if known is not None:
                verified, before = known
                data = read_verified(verified, WEIGHTS_FILE, check_hash=False)
            else:
                hashed_at = time.time_ns()
                before = entry_signature(entry)
                verified = verify_entry(entry, hash_files=True, hashed_by_caller=_HASHED_BY_READ)
                data = read_verified(verified, WEIGHTS_FILE)
            result = read(entry / WEIGHTS_FILE, data)
        except CorruptEntry as exc:
            self.verified.forget(entry)
            raise EntryRefused(f"it failed verification: {exc}", entry, removed=self._discard(entry)) from None
        if entry_signature(entry) != before:
            self.verified.forget(entry)
            raise EntryRefused("its files changed while vLLM read them", entry, removed=self._discard(entry))
        if known is None:
            self.verified.remember(verified, before, hashed_at)
        return entry, result

    def _discard(self, entry: Path) -> bool:
        discard_entry(entry, self.layout.tmp_path("evict", entry.name))
        return True
