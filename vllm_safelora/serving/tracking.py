"""Bounded LRU maps of prepared adapters, each value holding a lease on its cache entry.

The service remembers which entry paths it handed to vLLM (per-request check) and
which names are loaded (audit listing). Both maps are bounded: an adapter that drops
out gives its lease back, so its entry becomes evictable, and is simply prepared again
(a cache hit) if it is asked for later. No import of vLLM or of the service.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar


class _Leasing(Protocol):
    def lease(self, digest: str) -> bool: ...

    def release(self, digest: str) -> None: ...


class _HasDigest(Protocol):
    digest: str


V = TypeVar("V", bound=_HasDigest)


class LeasedLRU(Generic[V]):
    """``key -> value`` with at most ``capacity`` items, least recently used dropped first.

    Every stored value holds one lease on ``value.digest`` (taken by :meth:`put`, or
    handed over with ``leased=True``) until it is replaced, popped or dropped. Leases are
    given back outside the map's lock. Cost per call: O(1).
    """

    def __init__(self, capacity: int, leases: _Leasing):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._leases = leases
        self._items: OrderedDict[str, tuple[V, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> V | None:
        """The value, marked as most recently used."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def peek(self, key: str) -> V | None:
        """The value, without changing its place in the LRU order."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def snapshot(self) -> dict[str, V]:
        with self._lock:
            return {k: v for k, (v, _) in self._items.items()}

    def put(self, key: str, value: V, *, leased: bool = False) -> tuple[V | None, list[tuple[str, V]]]:
        """Store ``value`` as the most recently used; returns (the value it replaced, the
        items dropped to stay within ``capacity``). ``leased=True``: the caller hands over
        a lease it already holds on ``value.digest``; otherwise one is taken (a failed take,
        because the entry is being evicted, leaves the value unleased: it is then rebuilt
        on its next use)."""
        with self._lock:
            current = self._items.get(key)
            if current is not None and current[1] and current[0].digest == value.digest:
                # Same entry again (e.g. every request re-marks its adapter): keep the lease.
                self._items[key] = (value, True)
                self._items.move_to_end(key)
                fast = True
            else:
                fast = False
        if fast:
            if leased:
                self._leases.release(value.digest)  # the one handed over is not needed
            return current[0], []
        holds = leased or self._leases.lease(value.digest)
        give_back: list[str] = []
        with self._lock:
            previous = self._items.pop(key, None)
            self._items[key] = (value, holds)
            dropped = []
            while len(self._items) > self.capacity:
                old_key, old = self._items.popitem(last=False)
                dropped.append((old_key, old))
        if previous is not None and previous[1]:
            give_back.append(previous[0].digest)
        give_back += [v.digest for _, (v, held) in dropped if held]
        for digest in give_back:
            self._leases.release(digest)
        return (previous[0] if previous else None), [(k, v) for k, (v, _) in dropped]

    def pop(self, key: str) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
        if item is None:
            return None
        if item[1]:
            self._leases.release(item[0].digest)
        return item[0]

    def clear(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
        for value, held in items:
            if held:
                self._leases.release(value.digest)
