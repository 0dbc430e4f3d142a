"""Storage faults of the cache's file system (full, read-only), told apart from everything else.

A full or read-only cache is the operator's to fix and says nothing about the adapter being
prepared: a new entry is answered 503 + Retry-After (:class:`~vllm_safelora.errors.CacheUnavailable`)
and never remembered as a refusal, while entries already on disk keep being served. What a hit
writes (its index row's last use, its lease row) is best-effort under such a fault: the LRU
order of that entry goes stale, and a lease is held in this process's memory and written at the
next cache operation that can write (``Leases``), which is safe because no process can mark an
entry for eviction while the index cannot be written either.
"""

from __future__ import annotations

import errno
import sqlite3

# How long a client should wait before asking again: freeing space is an operator's action.
RETRY_AFTER_S = 30.0

_ERRNO_FAULTS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read_only"}
_SQLITE_FAULTS = (("disk is full", "full"), ("readonly database", "read_only"), ("read-only", "read_only"))


def storage_fault(exc: BaseException) -> str | None:
    """``"full"`` or ``"read_only"`` if ``exc`` (or what caused it) is such a fault, else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _ERRNO_FAULTS:
            return _ERRNO_FAULTS[exc.errno]
        if isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            for fragment, fault in _SQLITE_FAULTS:
                if fragment in text:
                    return fault
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
