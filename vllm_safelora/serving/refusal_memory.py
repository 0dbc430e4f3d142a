"""Refusals remembered, so an adapter that was expensive to refuse is refused again for free.

Keyed by what decides the outcome: the adapter's content hash and the tenant policy
(its cache policy id and admission rules); the bank and read limits are fixed for a
service's life. A second, cheaper key is the files' identity (device, inode, size,
mtime of both files), so a repeated request for the same unchanged files is answered
without even reading them again. Both maps are LRU-bounded: memory is at most
``max_entries`` refusals (each detail cut to ``MAX_DETAIL`` characters).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from ..errors import AdapterRefused, RefusalReason

MAX_DETAIL = 1024

# Refusals that depend on where or how an adapter was asked for, or on a race,
# not on its bytes: never remembered.
NOT_REMEMBERED = frozenset(
    {
        RefusalReason.NOT_FOUND,
        RefusalReason.INVALID_NAME,
        RefusalReason.CHANGED_WHILE_READING,
        RefusalReason.NAME_IN_USE,
    }
)


class _LRU:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, tuple[RefusalReason, str]] = OrderedDict()

    def get(self, key: Hashable) -> tuple[RefusalReason, str] | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: tuple[RefusalReason, str]) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class RefusalCache:
    def __init__(self, max_entries: int):
        self._by_content = _LRU(max_entries)
        self._by_files = _LRU(max_entries)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_content)

    def remember(self, exc: AdapterRefused, content_key: Hashable | None, files_key: Hashable | None) -> None:
        if exc.reason in NOT_REMEMBERED:
            return
        value = (exc.reason, exc.detail[:MAX_DETAIL])
        with self._lock:
            if content_key is not None:
                self._by_content.put(content_key, value)
            if files_key is not None:
                self._by_files.put(files_key, value)

    def by_content(self, content_key: Hashable) -> AdapterRefused | None:
        with self._lock:
            value = self._by_content.get(content_key)
        return None if value is None else _refusal(value)

    def by_files(self, files_key: Hashable) -> AdapterRefused | None:
        with self._lock:
            value = self._by_files.get(files_key)
        return None if value is None else _refusal(value)


def _refusal(value: tuple[RefusalReason, str]) -> AdapterRefused:
    reason, detail = value
    return AdapterRefused(reason, f"{detail} (refused before; this content is not read again)")
