"""Content-addressed, bounded, multi-process-safe store of patched (projected) adapters.

An entry is the patched adapter for one (uploaded adapter content, alignment bank,
policy) triple. vLLM is only ever pointed at an entry directory, so an entry must be
either complete and verified or absent: it is built in a temp directory, hashed,
fsynced and renamed into place in one step, and checked against its manifest on every
read. All state lives on disk, so restarts and several server processes share it.

Layout under ``root``::

    entries/<digest>/       the patched adapter files + cache_entry.json (manifest)
    tmp/<kind>.<pid>....    builds in progress and entries being deleted
    locks/<digest>.lock     flock files for cross-process single-flight (kept, empty)
    locks/<digest>.lease    shared flocks held by every process that has handed the entry
                            to vLLM: vLLM re-reads an adapter from disk after its own LRU
                            evicts it, so an entry in use anywhere must never be deleted
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import fcntl

from .errors import ConfigError
from .fsutil import fsync_dir, sha256_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "cache_entry.json"
# Temp dirs of a live process are left alone unless they are this old; a build that
# takes longer than this would be deleted under its owner.
STALE_TMP_AGE_S = 3600.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LOCK_POLL_S = 0.02


@dataclass(frozen=True)
class CacheKey:
    """What makes two patched adapters the same: the same input, bank and policy."""

    adapter_hash: str  # sha256 (64 lowercase hex) of the uploaded adapter's content
    bank_id: str  # identity of the alignment bank the projection used
    policy_id: str  # stable digest of the policy configuration

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_hash, str) or not _HEX64.fullmatch(self.adapter_hash):
            raise ValueError(f"CacheKey.adapter_hash must be 64 lowercase hex digits, got {self.adapter_hash!r}")
        for field in ("bank_id", "policy_id"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CacheKey.{field} must be a non-empty string, got {value!r}")

    def as_dict(self) -> dict[str, str]:
        return {"adapter_hash": self.adapter_hash, "bank_id": self.bank_id, "policy_id": self.policy_id}

    def digest(self) -> str:
        # JSON encoding keeps the field boundaries unambiguous (("a","bc") != ("ab","c"));
        # the tag lets a future key layout never collide with this one.
        payload = json.dumps(
            ["vllm-safelora/cache-key/v1", self.adapter_hash, self.bank_id, self.policy_id],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def describe(self) -> str:
        return f"adapter sha256 {self.adapter_hash[:12]}, bank {self.bank_id!r}, policy {self.policy_id!r}"


@dataclass(frozen=True)
class CacheEntry:
    """A complete, (verified if the cache verifies) entry on disk."""

    key: CacheKey
    path: Path  # entries/<digest>; hand this directory to vLLM
    files: dict[str, str]  # adapter file name -> sha256 (manifest not included)
    nbytes: int  # bytes on disk, manifest included
    created: float  # unix time the entry was sealed

    @property
    def digest(self) -> str:
        return self.path.name


class CorruptEntry(Exception):
    """An entry directory exists but cannot be trusted; the message says why."""

def read_entry_manifest(path: Path) -> tuple[CacheKey, dict[str, dict], float, int]:
    """Parse and structurally check an entry's manifest. Raises CorruptEntry."""
    mpath = path / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError:
        raise CorruptEntry("the manifest cache_entry.json is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"the manifest cannot be read ({exc})") from None
    if not isinstance(doc, dict):
        raise CorruptEntry("the manifest is not a JSON object")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CorruptEntry(f"manifest format {doc.get('format_version')!r} is not {FORMAT_VERSION}")
    try:
        key = CacheKey(**doc["key"])
        files = doc["files"]
        created = float(doc["created"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"the manifest is malformed ({exc})") from None
    if key.digest() != path.name:
        raise CorruptEntry("the manifest's key does not match the entry's directory name")
    if not isinstance(files, dict) or not files:
        raise CorruptEntry("the manifest lists no files")
    for name, meta in files.items():
        if (
            not isinstance(name, str) or name in ("", ".", "..", MANIFEST_NAME) or "/" in name or "\0" in name
            or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
            or not isinstance(meta.get("size"), int) or meta["size"] < 0
        ):
            raise CorruptEntry(f"the manifest has a bad file record {name!r}")
    return key, files, created, len(raw)


def verify_entry(path: Path, *, hash_files: bool = True) -> CacheEntry:
    """Check that ``path`` is a complete, unaltered entry: exactly the files its manifest
    lists, each a regular file of the recorded size and (``hash_files``) sha256.

    Pure: reads, never writes or deletes. Shared by the cache and the worker guard.
    Raises CorruptEntry saying what is wrong.
    """
    path = Path(path)
    try:
        present = set(os.listdir(path))
    except OSError as exc:
        raise CorruptEntry(f"the entry directory cannot be listed ({exc})") from None
    key, files, created, manifest_size = read_entry_manifest(path)
    expected = set(files) | {MANIFEST_NAME}
    if present != expected:
        # vLLM picks up optional files (e.g. new_embeddings.*) from the directory, so
        # an extra file is as dangerous as a modified one.
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise CorruptEntry(f"files do not match the manifest (unexpected {extra}, missing {missing})")
    nbytes = manifest_size
    for name, meta in files.items():
        fpath = path / name
        try:
            st = os.lstat(fpath)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptEntry(f"{name} is not a regular file")
            if st.st_size != meta["size"]:
                raise CorruptEntry(f"{name} is {st.st_size} bytes, the manifest says {meta['size']}")
            if hash_files and sha256_file(fpath, follow_symlinks=False) != meta["sha256"]:
                raise CorruptEntry(f"{name} does not match its sha256 in the manifest")
        except OSError as exc:
            raise CorruptEntry(f"{name} cannot be read ({exc})") from None
        nbytes += st.st_size
    return CacheEntry(key=key, path=path, files={n: m["sha256"] for n, m in files.items()}, nbytes=nbytes, created=created)


def entry_signature(path: Path) -> tuple:
    """(name, size, mtime_ns, inode) of an entry's files, manifest excluded (its mtime records use)."""
    try:
        return tuple(
            (e.name, st.st_size, st.st_mtime_ns, st.st_ino)
            for e in sorted(os.scandir(path), key=lambda e: e.name)
            if e.name != MANIFEST_NAME
            for st in (e.stat(follow_symlinks=False),)
        )
    except OSError:
        return ()


def entry_path_in(path: Path | str, entries_dir: Path) -> Path | None:
    """``path`` resolved, if it names an entry directory (entries/<64 hex>) under ``entries_dir``."""
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(entries_dir)) or not _HEX64.fullmatch(real.name):
        return None
    return real


def remove_tree(path: Path) -> None:
    """Delete a directory tree whose files and directories were made read-only."""
    def unlock(func, target, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o755)
            os.chmod(target, 0o755)
            func(target)

    with contextlib.suppress(OSError):
        os.chmod(path, 0o755)
    shutil.rmtree(path, onerror=unlock)


def discard_entry(path: Path, trash: Path) -> bool:
    """Remove an entry directory: rename it to ``trash`` (same filesystem) first, so readers
    see the whole entry or nothing, then delete it. False if it was already gone."""
    try:
        # Moving a directory to another parent rewrites its "..": it must be writable.
        os.chmod(path, 0o755)
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    remove_tree(trash)
    return True



def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


class PatchedAdapterCache:
    """See the module docstring. Thread-safe and safe across processes sharing ``root``."""

    def __init__(self, root: Path | str, max_bytes: int, *, verify: bool = True, lock_timeout_s: float = 600):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"patched-adapter cache size limit must be a positive number of bytes, got {max_bytes!r}")
        if lock_timeout_s <= 0:
            raise ConfigError(f"patched-adapter cache lock timeout must be positive, got {lock_timeout_s!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.verify = verify
        self.lock_timeout_s = float(lock_timeout_s)
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self._prepare_dirs()
        # digest -> [lock, number of threads using it]; dropped when unused so the
        # dict does not grow with every key ever seen.
        self._key_locks: dict[str, list] = {}
        self._key_locks_guard = threading.Lock()
        self._evict_guard = threading.Lock()
        self._leases: dict[str, int] = {}
        self._leases_guard = threading.Lock()
        self.cleanup_stale_tmp()

    # ------------------------------------------------------------------ set-up

    def _prepare_dirs(self) -> None:
        fix = "create it (or its parent) and make it writable by the server's user, or configure another cache directory"
        for d in (self.root, self.entries_dir, self.tmp_dir, self.locks_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"patched-adapter cache directory {str(d)!r} cannot be created ({exc}); {fix}") from exc
            if not d.is_dir():
                raise ConfigError(f"patched-adapter cache path {str(d)!r} exists but is not a directory; {fix}")
        # os.access can say yes on a read-only mount; a real write is the only proof.
        for d in (self.entries_dir, self.tmp_dir, self.locks_dir):
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

    def _tmp_path(self, kind: str, digest: str) -> Path:
        # Owner pid and host are in the name so start-up clean-up can tell whether the
        # process that made it is gone.
        return self.tmp_dir / f"{kind}.{os.getpid()}.{_HOST}.{digest[:16]}.{uuid.uuid4().hex[:12]}"

    def cleanup_stale_tmp(self) -> list[str]:
        """Delete temp dirs left by crashed processes; returns the names removed."""
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
            if len(parts) == 5 and parts[1].isdigit() and parts[2] == _HOST:
                pid = int(parts[1])
                owner_dead = pid != os.getpid() and not _pid_alive(pid)
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
                self.root, len(removed), "y" if len(removed) == 1 else "ies",
            )
        return removed

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def _locked(self, digest: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the per-key thread lock, then the per-key flock. Yields False if not
        ``blocking`` and either is busy; raises TimeoutError after ``lock_timeout_s``."""
        with self._key_locks_guard:
            slot = self._key_locks.setdefault(digest, [threading.Lock(), 0])
            slot[1] += 1
        try:
            lock: threading.Lock = slot[0]
            got = lock.acquire(timeout=self.lock_timeout_s) if blocking else lock.acquire(blocking=False)
            if not got:
                if not blocking:
                    yield False
                    return
                raise TimeoutError(self._timeout_message(digest))
            try:
                fd = os.open(self.locks_dir / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    if self._flock(fd, blocking, digest):
                        try:
                            yield True
                        finally:
                            fcntl.flock(fd, fcntl.LOCK_UN)
                    else:
                        yield False
                finally:
                    os.close(fd)
            finally:
                lock.release()
        finally:
            with self._key_locks_guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._key_locks[digest]

    def _flock(self, fd: int, blocking: bool, digest: str) -> bool:
        # Poll rather than block so the timeout is honoured.
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not blocking:
                    return False
                if time.monotonic() >= deadline:
                    raise TimeoutError(self._timeout_message(digest)) from None
                time.sleep(_LOCK_POLL_S)

    def _timeout_message(self, what: object) -> str:
        return (
            f"patched-adapter cache {self.root}: waited {self.lock_timeout_s:.0f}s for another thread or "
            f"process working on entry {str(what)[:16]}; it may be stuck. Check for hung server processes"
        )

    # ------------------------------------------------------------------ reading

    def _load(self, key: CacheKey) -> CacheEntry | None:
        """The entry for ``key`` if present and intact; None if absent; CorruptEntry otherwise."""
        path = self.entries_dir / key.digest()
        if not os.path.lexists(path):
            return None
        entry = verify_entry(path, hash_files=self.verify)
        if entry.key != key:
            raise CorruptEntry("the manifest belongs to a different key")
        return entry

    def _touch(self, entry: CacheEntry) -> None:
        # Last use is the manifest's mtime: no extra file in the entry, and eviction
        # can sort on a single stat per entry.
        now = time.time_ns()
        try:
            os.utime(entry.path / MANIFEST_NAME, ns=(now, now))
        except OSError as exc:
            logger.debug("patched-adapter cache: could not record use of %s: %s", entry.digest, exc)

    def _report_corrupt(self, key: CacheKey, why: str) -> None:
        logger.warning(
            "patched-adapter cache: entry %s (%s) failed verification: %s. Removed it; it will be rebuilt "
            "from the original adapter. If this keeps happening, check the disk under %s",
            key.digest()[:16], key.describe(), why, self.root,
        )

    def _load_or_discard(self, key: CacheKey) -> CacheEntry | None:
        """Like _load, but removes a corrupt entry. Call with the key's locks held, so
        nobody is publishing a fresh entry at the same path while we delete."""
        try:
            return self._load(key)
        except CorruptEntry as exc:
            self._report_corrupt(key, str(exc))
            self._discard(self.entries_dir / key.digest())
            return None

    def get(self, key: CacheKey) -> CacheEntry | None:
        """A verified entry for ``key`` (recording its use), or None."""
        try:
            entry = self._load(key)
        except CorruptEntry:
            # Re-check under the lock: it may have been mid-eviction, or replaced since.
            with self._locked(key.digest()):
                entry = self._load_or_discard(key)
        if entry is not None:
            self._touch(entry)
        return entry

    # ------------------------------------------------------------------ writing

    def get_or_create(self, key: CacheKey, build: Callable[[Path], object]) -> tuple[CacheEntry, bool, object | None]:
        """Return ``(entry, hit, build_result)``; ``build(tmpdir)`` runs only on a miss,
        once per key across threads and processes. ``build`` must write plain files
        (not ``cache_entry.json``) directly into ``tmpdir``. If it raises, nothing is
        kept and its exception propagates unchanged."""
        entry = self.get(key)
        if entry is not None:
            return entry, True, None
        digest = key.digest()
        with self._locked(digest):
            # Someone else may have built it while we waited for the lock.
            entry = self._load_or_discard(key)
            if entry is not None:
                self._touch(entry)
                return entry, True, None
            entry, result = self._build(key, build)
        logger.info(
            "patched-adapter cache: stored entry %s (%s), %d bytes", digest[:16], key.describe(), entry.nbytes
        )
        self.evict_to_budget(protect={digest})
        return entry, False, result

    # ------------------------------------------------------------------ leases

    def lease(self, digest: str) -> None:
        """Mark an entry as in use by this process until it exits (shared flock)."""
        with self._leases_guard:
            if digest in self._leases:
                return
            fd = os.open(self.locks_dir / f"{digest}.lease", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._leases[digest] = fd

    def release(self, digest: str) -> None:
        with self._leases_guard:
            fd = self._leases.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def _leased_elsewhere(self, digest: str) -> bool:
        path = self.locks_dir / f"{digest}.lease"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe lock
        return False

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
            return verify_entry(real, hash_files=self.verify)
        except CorruptEntry as exc:
            logger.error("patched-adapter cache: entry %s failed verification: %s", real.name[:16], exc)
            return None

    def _build(self, key: CacheKey, build: Callable[[Path], object]) -> tuple[CacheEntry, object]:
        digest = key.digest()
        tmp = self._tmp_path("build", digest)
        tmp.mkdir(mode=0o755)
        try:
            result = build(tmp)
            self._seal(tmp, key)
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
                    return theirs, result
                os.rename(tmp, final)
            fsync_dir(self.entries_dir)
            # Nothing may add, replace or remove a file in a published entry (vLLM reads
            # every file in it); eviction makes it writable again just before removal.
            with contextlib.suppress(OSError):
                os.chmod(final, 0o555)
        except BaseException:
            remove_tree(tmp)
            raise
        entry = self._load(key)
        if entry is None:  # pragma: no cover - we just renamed it into place under the lock
            raise RuntimeError(f"patched-adapter cache entry {digest} vanished right after it was written")
        return entry, result

    def _seal(self, tmp: Path, key: CacheKey) -> None:
        """Hash and fsync what build wrote, then write and fsync the manifest."""
        names = sorted(os.listdir(tmp))
        if not names:
            raise RuntimeError(f"patched-adapter build wrote no files into {tmp}")
        if MANIFEST_NAME in names:
            raise RuntimeError(f"patched-adapter build must not write {MANIFEST_NAME} (the cache owns it)")
        files = {}
        for name in names:
            fpath = tmp / name
            st = os.lstat(fpath)
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeError(f"patched-adapter build must write plain files only; {name!r} in {tmp} is not one")
            files[name] = {"sha256": sha256_file(fpath, fsync=True, follow_symlinks=False), "size": st.st_size}
            # Read-only: nothing should modify a published entry in place.
            os.chmod(fpath, 0o444)
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key.as_dict(),
            "digest": key.digest(),
            "files": files,
            "nbytes": sum(f["size"] for f in files.values()),
            "created": time.time(),
        }
        with open(tmp / MANIFEST_NAME, "x", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp / MANIFEST_NAME, 0o444)  # its mtime still records use: utime needs ownership, not write
        fsync_dir(tmp)

    def _discard(self, path: Path) -> bool:
        """Remove an entry directory: rename it into tmp/ first, so readers see the whole
        entry or nothing, then delete it. False if it was already gone."""
        return discard_entry(path, self._tmp_path("evict", path.name))

    def remove(self, key: CacheKey) -> bool:
        """Delete the entry for ``key``; False if there was none."""
        digest = key.digest()
        with self._locked(digest):
            return self._discard(self.entries_dir / digest)

    # ------------------------------------------------------------------ budget

    def _entry_dirs(self) -> list[Path]:
        try:
            names = os.listdir(self.entries_dir)
        except FileNotFoundError:
            return []
        return [self.entries_dir / n for n in sorted(names) if _HEX64.fullmatch(n)]

    @staticmethod
    def _last_used(path: Path) -> float:
        try:
            return os.stat(path / MANIFEST_NAME).st_mtime
        except OSError:
            return 0.0  # no manifest: broken, evict first

    def entries(self) -> list[CacheEntry]:
        """Entries whose manifest reads cleanly (files are not re-hashed here)."""
        out = []
        for path in self._entry_dirs():
            try:
                key, files, created, manifest_size = read_entry_manifest(path)
            except CorruptEntry:
                continue
            out.append(
                CacheEntry(
                    key=key,
                    path=path,
                    files={n: m["sha256"] for n, m in files.items()},
                    nbytes=manifest_size + sum(m["size"] for m in files.values()),
                    created=created,
                )
            )
        return out

    def total_bytes(self) -> int:
        """Bytes on disk under entries/ (what the budget limits)."""
        return sum(_dir_size(p) for p in self._entry_dirs())

    def evict_to_budget(self, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete least-recently-used entries until the total is within ``max_bytes``.

        ``protect`` holds digests that must stay (e.g. adapters vLLM is loading now).
        Entries another thread or process holds the lock for are skipped. Returns the
        digests removed, oldest first.
        """
        with self._evict_guard:
            rows = [(self._last_used(p), p.name, p, _dir_size(p)) for p in self._entry_dirs()]
            total = sum(r[3] for r in rows)
            evicted: list[str] = []
            if total <= self.max_bytes:
                return evicted
            for last_used, digest, path, size in sorted(rows):
                if total <= self.max_bytes:
                    break
                if digest in protect or digest in self._leases or self._leased_elsewhere(digest):
                    continue
                with self._locked(digest, blocking=False) as got:
                    # Skip if busy, or if it was used since we listed it.
                    if not got or self._last_used(path) > last_used:
                        continue
                    if self._discard(path):
                        evicted.append(digest)
                        logger.info(
                            "patched-adapter cache: evicted least-recently-used entry %s (%d bytes) to stay "
                            "within %d bytes; it will be rebuilt if requested again",
                            digest[:16], size, self.max_bytes,
                        )
                    total -= size
            if total > self.max_bytes:
                logger.warning(
                    "patched-adapter cache %s holds %d bytes, over its %d-byte limit, because the remaining "
                    "entries are in use or were just created; raise the limit if this persists",
                    self.root, total, self.max_bytes,
                )
            return evicted
