"""Content-addressed, bounded, multi-process-safe store of patched (projected) adapters.

An entry is the patched adapter for one (uploaded adapter content, alignment bank,
policy) triple. vLLM is only ever pointed at an entry directory, so an entry must be
either complete and verified or absent: it is built in a temp directory, hashed,
fsynced and renamed into place in one step, and checked against its manifest on every
read (sealing: seal.py). Several server processes on one host share a cache directory
(layout.py).

Cost per operation does not depend on the number of entries: a hit verifies one
entry and writes two index rows; a miss builds one entry; eviction walks the index's
LRU order from the oldest entry and stops as soon as the cache is within budget. The
only listing of entries/ is at start-up (rebuild.py).

Budget: after every miss, and after leases are given back, least-recently-used
entries are deleted until the total is within ``max_bytes`` (evict.py). Entries some
process leases (vLLM may still read them), entries another process is working on, and
the entry just built are never deleted, so the total can exceed ``max_bytes`` by those.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import weakref
from pathlib import Path
from collections.abc import Callable, Mapping

from ..errors import CacheUnavailable, ConfigError
from ..fsutil import ctime_trusted, fsync_dir
from .entry import (
    FILE_HASH,
    HEX64,
    MANIFEST_NAME,
    CacheEntry,
    CacheKey,
    CorruptEntry,
    discard_entry,
    entry_path_in,
    entry_signature,
    read_entry_manifest,
    remove_tree,
    verify_entry,
)
from .evict import Evictor
from .faults import RETRY_AFTER_S, storage_fault
from .index import CacheIndex, IndexStats
from .layout import CacheLayout
from .leases import Leases
from .locks import KeyLocks
from .verified import VerifiedEntries
from .rebuild import ReconcileReport, reconcile
from .seal import seal_entry

logger = logging.getLogger(__name__)

_INDEX_LOCK = "index"  # the key lock taken while the index is opened and reconciled


class PatchedAdapterCache:
    """See the module docstring. Thread-safe and safe across processes sharing ``root``."""

    def __init__(
        self,
        root: Path | str,
        max_bytes: int,
        *,
        verify: bool = True,
        lock_timeout_s: float = 600,
        index_busy_timeout_s: float = 30.0,
    ):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ConfigError(f"patched-adapter cache size limit must be a positive number of bytes, got {max_bytes!r}")
        if lock_timeout_s <= 0:
            raise ConfigError(f"patched-adapter cache lock timeout must be positive, got {lock_timeout_s!r}")
        self.layout = CacheLayout(Path(root))
        self.root = self.layout.root
        self.entries_dir = self.layout.entries_dir
        self.tmp_dir = self.layout.tmp_dir
        self.locks_dir = self.layout.locks_dir
        self.max_bytes = max_bytes
        self.verify = verify
        # A hit on an entry this process hashed costs a stat (verified.py), where ctime can be trusted.
        self.ctime_trusted, self.filesystem = ctime_trusted(self.root)
        self.verified = VerifiedEntries(trusted=verify and self.ctime_trusted)
        self.lock_timeout_s = float(lock_timeout_s)
        self.layout.prepare()
        self.locks = KeyLocks(self.locks_dir, self.lock_timeout_s)
        self.index = CacheIndex(self.layout.index_path, busy_timeout_s=index_busy_timeout_s)
        self.leases = Leases(self.index, self.layout.owners_dir)
        self.evictor = Evictor(self.index, self.locks, self.leases, self.entries_dir, self._discard, self.root)
        self.cleanup_stale_tmp()
        self.startup: ReconcileReport = self._open_index()
        _LIVE.add(self)

    # ------------------------------------------------------------------ set-up

    def _open_index(self) -> ReconcileReport:
        with self.locks.hold(_INDEX_LOCK):
            state = self.index.open()
            report = reconcile(self.index, self.entries_dir, state)
            # An evictor that died between marking and deleting left 'evicting': whoever
            # gets the key lock now knows nobody is evicting it.
            for digest in self.index.evicting():
                with self.locks.hold(digest, blocking=False) as got:
                    if got:
                        if os.path.lexists(self.entries_dir / digest):
                            self.index.publish(digest, self.index.get(digest)[0])
                        else:
                            self.index.remove(digest)
        return report

    def cleanup_stale_tmp(self) -> list[str]:
        """Delete temp dirs left by crashed processes; returns the names removed."""
        return self.layout.cleanup_stale_tmp()

    def close(self) -> None:
        """Give back this process's leases and close the index (tests, tools; servers just exit)."""
        self.leases.close()
        self.index.close()

    # ------------------------------------------------------------------ locking

    def _locked(self, digest: str, *, blocking: bool = True):
        return self.locks.hold(digest, blocking=blocking)

    # ------------------------------------------------------------------ reading

    def _load(self, key: CacheKey) -> CacheEntry | None:
        """The entry for ``key`` if present and intact; None if absent; CorruptEntry otherwise."""
        path = self.entries_dir / key.digest()
        if not os.path.lexists(path):
            return None
        entry = self._verified_at(path)
        if entry.key != key:
            raise CorruptEntry("the manifest belongs to a different key")
        return entry

    def _verified_at(self, path: Path) -> CacheEntry:
        """verify_entry, or a stat where this process hashed the entry and it is unchanged since."""
        known = self.verified.unchanged(path)
        if known is not None:
            return known[0]
        hashed_at, signature = time.time_ns(), entry_signature(path)
        entry = verify_entry(path, hash_files=self.verify)
        if self.verify:
            self.verified.remember(entry, signature, hashed_at)
        return entry

    def _touch_manifest(self, entry: CacheEntry) -> None:
        # The manifest's mtime also records use, so an index rebuilt from the directory
        # keeps the LRU order. One syscall, independent of the number of entries.
        now = time.time_ns()
        try:
            os.utime(entry.path / MANIFEST_NAME, ns=(now, now))
        except OSError as exc:
            logger.debug("patched-adapter cache: could not record use of %s: %s", entry.digest, exc)

    def _report_corrupt(self, key: CacheKey, why: str) -> None:
        logger.warning(
            "patched-adapter cache: entry %s (%s) failed verification: %s. Removed it; it will be rebuilt "
            "from the original adapter. If this keeps happening, check the disk under %s",
            key.digest()[:16],
            key.describe(),
            why,
            self.root,
        )

    def _load_or_discard(self, key: CacheKey) -> CacheEntry | None:
        """Like _load, but removes a corrupt entry. Call with the key's lock held, so
        nobody is publishing a fresh entry at the same path while we delete."""
        try:
            return self._load(key)
        except CorruptEntry as exc:
            self._report_corrupt(key, str(exc))
            self._discard(self.entries_dir / key.digest())
            return None

    def get(self, key: CacheKey) -> CacheEntry | None:
        """A verified entry for ``key`` (recording its use), or None. Not leased: another
        process may evict it at any time (serving paths use ``get_or_create(lease=True)``)."""
        try:
            entry = self._load(key)
        except CorruptEntry:
            # Re-check under the lock: it may have been mid-eviction, or replaced since.
            with self.locks.hold(key.digest()):
                entry = self._load_or_discard(key)
        if entry is not None:
            self._record_use(entry)
        return entry

    def _record_use(self, entry: CacheEntry, origin: str | None = None) -> None:
        self._touch_manifest(entry)
        try:
            self.index.record_use(entry.digest, entry.nbytes, origin=origin)
        except Exception as exc:
            # A hit must not fail because its last use cannot be written (faults.py): the
            # entry's LRU position goes stale, which only makes it an earlier eviction candidate.
            if storage_fault(exc) is None:
                raise
            logger.debug("patched-adapter cache: could not record use of %s: %s", entry.digest[:16], exc)

    def unavailable(self, exc: BaseException) -> CacheUnavailable | None:
        """The 503 for a storage fault (full, read-only) of this cache's file system; None for anything else."""
        fault = storage_fault(exc)
        if fault is None:
            return None
        return CacheUnavailable(self.root, fault, f"{type(exc).__name__}: {exc}", RETRY_AFTER_S)

    # ------------------------------------------------------------------ writing

    def get_or_create(
        self,
        key: CacheKey,
        build: Callable[[Path], object],
        *,
        lease: bool = False,
        origin: str | None = None,
    ) -> tuple[CacheEntry, bool]:
        """Return ``(entry, hit)``; ``build(tmpdir)`` runs only on a miss, once per key
        across threads and processes. ``build`` must write plain files (not
        ``cache_entry.json``) directly into ``tmpdir``; it may return a mapping
        {file name: blake3 of the bytes it wrote and fsynced} (as ``write_adapter_files``
        does), and those files are then not read back; any other return value is ignored.
        If it raises, nothing is kept and its exception propagates unchanged.

        ``lease=True``: the entry comes back leased by this process (taken before it is
        verified, so no eviction can slip in between); give it back with :meth:`release`.
        ``origin`` records where the uploaded adapter was read from (see ``index.origin``).
        """
        self.flush_releases()
        digest = key.digest()
        leased = lease and self.leases.try_acquire(digest)
        try:
            return self._get_or_build(key, build, digest, lease, leased, origin)
        except CacheUnavailable:
            raise
        except Exception as exc:
            unavailable = self.unavailable(exc)
            if unavailable is None:
                raise
            logger.warning("patched-adapter cache: %s", unavailable)
            raise unavailable from exc

    def _get_or_build(
        self,
        key: CacheKey,
        build: Callable[[Path], object],
        digest: str,
        lease: bool,
        leased: bool,
        origin: str | None,
    ) -> tuple[CacheEntry, bool]:
        try:
            if leased or not lease:
                try:
                    entry = self._load(key)
                except CorruptEntry:
                    entry = None  # dealt with under the lock below
                if entry is not None:
                    self._record_use(entry, origin)
                    return entry, True
            with self.locks.hold(digest):
                # Someone else may have built it while we waited for the lock.
                entry = self._load_or_discard(key)
                hit = entry is not None
                if not hit:
                    entry = self._build(key, build)
                self._touch_manifest(entry)
                self.index.publish(digest, entry.nbytes, origin=origin)
                if lease and not leased:
                    self.leases.acquire(digest)
                    leased = True
        except BaseException:
            if leased:
                self.leases.release(digest)
            raise
        if hit:
            return entry, True
        logger.info("patched-adapter cache: stored entry %s (%s), %d bytes", digest[:16], key.describe(), entry.nbytes)
        try:
            self.evict_to_budget(protect={digest})
        except Exception as exc:  # the entry is stored and leased: serve it, evict at the next chance
            if storage_fault(exc) is None:
                raise
            logger.warning(
                "patched-adapter cache: eviction deferred, the cache directory %s is full: %s", self.root, exc
            )
        return entry, False

    def get_leased(self, key: CacheKey, origin: str | None = None) -> CacheEntry | None:
        """The entry for ``key``, leased by this process, if it is on disk and intact; None otherwise
        (nothing is built: a caller that can build uses :meth:`get_or_create`)."""
        digest = key.digest()
        if not self.leases.try_acquire(digest):
            return None
        try:
            try:
                entry = self._load(key)
            except CorruptEntry:
                entry = None  # get_or_create discards it under the key's lock
            if entry is not None:
                self._record_use(entry, origin)
        except BaseException:
            self.leases.release(digest)
            raise
        if entry is None:
            self.leases.release(digest)
        return entry

    def release(self, digest: str) -> None:
        """Give back one lease taken by ``get_or_create(..., lease=True)`` or :meth:`lease`.
        Cheap (memory only): safe to call from an event loop."""
        self.leases.release(digest)

    def lease(self, digest: str) -> bool:
        """Take one more lease on an entry this process already holds or that exists; False if
        it is being evicted right now."""
        return self.leases.try_acquire(digest)

    def flush_releases(self) -> None:
        """Delete the index rows of given-back leases and, if that lets the cache shrink, evict."""
        if self.leases.flush():
            try:
                self.evict_to_budget()
            except Exception as exc:
                if storage_fault(exc) is None:
                    raise
                logger.debug("patched-adapter cache: eviction deferred (%s)", exc)

    # ------------------------------------------------------------------ by path

    def entry_at(self, path: Path | str) -> CacheEntry | None:
        """The verified entry whose directory is ``path``, or None (read-only: never deletes).

        This is the worker-side check: vLLM may only load a directory that is an
        intact entry of this cache.
        """
        real = entry_path_in(path, self.entries_dir)
        if real is None:
            return None
        try:
            return self._verified_at(real)
        except CorruptEntry as exc:
            logger.error("patched-adapter cache: entry %s failed verification: %s", real.name[:16], exc)
            return None

    def _build(self, key: CacheKey, build: Callable[[Path], object]) -> CacheEntry:
        digest = key.digest()
        tmp = self.layout.tmp_path("build", digest)
        tmp.mkdir(mode=0o755)
        try:
            written = build(tmp)
            seal_entry(tmp, key, written if isinstance(written, Mapping) else None)
            final = self.entries_dir / digest
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another writer published first (only possible without our lock, e.g.
                # a lock-less filesystem). Keep theirs if it is intact.
                theirs = self._load_or_discard(key)
                if theirs is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return theirs
                os.rename(tmp, final)
            fsync_dir(self.entries_dir)
            # Nothing may add, replace or remove a file in a published entry (vLLM reads
            # every file in it); eviction makes it writable again just before removal.
            with contextlib.suppress(OSError):
                os.chmod(final, 0o555)
        except BaseException:
            remove_tree(tmp)
            raise
        # Hashed from the bytes written just now: check the published directory's structure
        # and sizes only (not a second read of every file).
        entry = verify_entry(self.entries_dir / digest, hash_files=False)
        if entry.key != key:  # pragma: no cover - we just renamed it into place under the lock
            raise RuntimeError(f"patched-adapter cache entry {digest} changed right after it was written")
        return entry

    def _discard(self, path: Path) -> bool:
        """Remove an entry directory: rename it into tmp/ first, so readers see the whole
        entry or nothing, then delete it. False if it was already gone."""
        self.verified.forget(path)
        return discard_entry(path, self.layout.tmp_path("evict", path.name))

    def remove(self, key: CacheKey) -> bool:
        """Delete the entry for ``key``; False if there was none."""
        digest = key.digest()
        with self.locks.hold(digest):
            removed = self._discard(self.entries_dir / digest)
            self.index.remove(digest)
            return removed

    # ------------------------------------------------------------------ budget

    def total_bytes(self) -> int:
        """Bytes of the entries on disk, from the index (one row read, whatever the number of entries)."""
        return self.index.total_bytes()

    def stats(self) -> IndexStats:
        """Entries, bytes, leases, owners and index file size: a few row reads (for metrics and benchmarks)."""
        return self.index.stats()

    def entries(self) -> list[CacheEntry]:
        """Entries whose manifest reads cleanly (files are not re-hashed here).

        Lists and reads every entry: for diagnostics and tests only, never on a serving path.
        """
        out = []
        for name in sorted(os.listdir(self.entries_dir)):
            if not HEX64.fullmatch(name):
                continue
            path = self.entries_dir / name
            try:
                key, files, created, manifest_size = read_entry_manifest(path)
            except CorruptEntry:
                continue
            out.append(
                CacheEntry(
                    key=key,
                    path=path,
                    files={n: m[FILE_HASH] for n, m in files.items()},
                    nbytes=manifest_size + sum(m["size"] for m in files.values()),
                    created=created,
                )
            )
        return out

    def evict_to_budget(self, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete least-recently-used entries until the total is within ``max_bytes``
        (``protect``: digests that must stay); returns the digests removed, oldest first (evict.py)."""
        return self.evictor.evict_to_budget(self.max_bytes, protect)


# Caches alive in this process: a forked child must not use their SQLite connection or
# believe it holds their leases.
_LIVE: weakref.WeakSet[PatchedAdapterCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache.index.forget_after_fork()
        cache.leases.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
