"""Content-addressed, bounded, multi-process-safe store of patched (projected) adapters.

Split by job:

* ``entry``   what an entry is (key, manifest) and the pure checks on one directory
              (``verify_entry``, ``entry_signature``, ...) the worker guard uses;
* ``layout``  the directory layout, temp paths, clean-up after crashed processes;
* ``locks``   per-key single-flight across threads and processes (flock);
* ``index_db`` the index's SQLite file: schema, WAL connection, setting aside a corrupt one;
* ``index``   the index's queries: sizes, last use, state, byte total, leases;
* ``rebuild`` reconciling the index with ``entries/`` at start-up;
* ``leases``  which entries each process may still hand to vLLM;
* ``seal``    hashing and fsyncing a freshly built entry and writing its manifest;
* ``evict``   keeping the cache within its byte budget (LRU, through the index);
* ``store``   ``PatchedAdapterCache``: look up, build once, publish, lease, verify by path;
* ``verified`` entries this process hashed, by identity: using one again costs a stat;
* ``worker_guard`` what a vLLM worker may load: intact entries only (``WorkerGuard``);
* ``shared_tier`` the fleet-shared tier in object storage: entries signed with the fleet key
              (imported by the serving stage only when configured).
"""

from .entry import (
    FILE_HASH,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheEntry,
    CacheKey,
    CorruptEntry,
    discard_entry,
    entry_path_in,
    entry_signature,
    signature_racy,
    read_entry_manifest,
    read_verified,
    remove_tree,
    verify_entry,
)
from .index import CacheIndex, IndexStats
from .layout import HOST as _HOST
from .layout import STALE_TMP_AGE_S, CacheLayout
from .leases import Leases
from .locks import KeyLocks
from .rebuild import ReconcileReport
from .store import PatchedAdapterCache

__all__ = [
    "FILE_HASH",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STALE_TMP_AGE_S",
    "CacheEntry",
    "CacheIndex",
    "CacheKey",
    "CacheLayout",
    "CorruptEntry",
    "IndexStats",
    "KeyLocks",
    "Leases",
    "PatchedAdapterCache",
    "ReconcileReport",
    "_HOST",
    "discard_entry",
    "entry_path_in",
    "entry_signature",
    "signature_racy",
    "read_entry_manifest",
    "read_verified",
    "remove_tree",
    "verify_entry",
]
