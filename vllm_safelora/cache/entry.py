"""What a cache entry is, and the pure checks on one (read-only: no cache object needed).

An entry is the directory ``entries/<digest>`` holding a patched adapter's files and
its manifest ``cache_entry.json`` (key, per-file blake3 and size). The worker guard
(vLLM's worker process) checks the directory it is about to load with
:func:`verify_entry` without ever constructing a writable cache, and the weights file
as it reads it (:func:`read_verified`).

Format 2 (blake3 file hashes and adapter content hashes) replaced format 1 (sha256):
a format-1 entry fails :func:`read_entry_manifest` like any corrupt entry, so it is
never trusted; it is evicted first and rebuilt on its next use (its key digest
differs too, because the adapter content hash is part of the key).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import FileIdentity, fast_hash, fast_hash_file

FORMAT_VERSION = 2
FILE_HASH = "blake3"  # the manifest's per-file hash field
MANIFEST_NAME = "cache_entry.json"
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CacheKey:
    """What makes two patched adapters the same: the same input, bank and policy."""

    adapter_hash: str  # blake3 content hash (64 lowercase hex) of the uploaded adapter (adapters.content_hash)
    bank_id: str  # identity of the alignment bank the projection used
    policy_id: str  # stable digest of the policy configuration

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_hash, str) or not HEX64.fullmatch(self.adapter_hash):
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
            ["vllm-safelora/cache-key/v2", self.adapter_hash, self.bank_id, self.policy_id],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def describe(self) -> str:
        return f"adapter {self.adapter_hash[:12]}, bank {self.bank_id!r}, policy {self.policy_id!r}"


@dataclass(frozen=True)
class CacheEntry:
    """A complete, (verified if the cache verifies) entry on disk."""

    key: CacheKey
    path: Path  # entries/<digest>; hand this directory to vLLM
    files: dict[str, str]  # adapter file name -> blake3 (manifest not included)
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
            not isinstance(name, str)
            or name in ("", ".", "..", MANIFEST_NAME)
            or "/" in name
            or "\0" in name
            or not isinstance(meta, dict)
            or not isinstance(meta.get(FILE_HASH), str)
            or not isinstance(meta.get("size"), int)
            or meta["size"] < 0
        ):
            raise CorruptEntry(f"the manifest has a bad file record {name!r}")
    return key, files, created, len(raw)


def verify_entry(path: Path, *, hash_files: bool = True, hashed_by_caller: frozenset[str] = frozenset()) -> CacheEntry:
    """Check that ``path`` is a complete, unaltered entry: exactly the files its manifest
    lists, each a regular file of the recorded size and (``hash_files``) blake3.
    ``hashed_by_caller``: files whose hash the caller checks as it reads them
    (:func:`read_verified`); only their type and size are checked here.

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
            if (
                hash_files
                and name not in hashed_by_caller
                and fast_hash_file(fpath, follow_symlinks=False) != meta[FILE_HASH]
            ):
                raise CorruptEntry(f"{name} does not match its {FILE_HASH} in the manifest")
        except OSError as exc:
            raise CorruptEntry(f"{name} cannot be read ({exc})") from None
        nbytes += st.st_size
    return CacheEntry(
        key=key, path=path, files={n: m[FILE_HASH] for n, m in files.items()}, nbytes=nbytes, created=created
    )


def read_verified(entry: CacheEntry, name: str, *, check_hash: bool = True) -> mmap.mmap:
    """One file of a verified entry, read once and checked against its manifest hash: the
    bytes returned are the bytes hashed, so nothing can change them between check and use.

    The buffer is private anonymous memory (not a mapping of the file, whose pages another
    writer could change), allocated without being zero-filled first. ``check_hash=False``:
    the caller proves the bytes unchanged otherwise (the file's identity, unchanged before
    and after the read, since this process hashed it: :mod:`.verified`). Raises CorruptEntry."""
    fpath = entry.path / name
    expected = entry.files.get(name)
    if expected is None:
        raise CorruptEntry(f"{name} is not in the manifest")
    try:
        fd = os.open(fpath, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise CorruptEntry(f"{name} cannot be read ({exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntry(f"{name} is not a regular file")
        buf = mmap.mmap(-1, max(1, st.st_size))
        view, got = memoryview(buf)[: st.st_size], 0
        while got < st.st_size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
        view.release()
        if got != st.st_size or os.read(fd, 1):
            raise CorruptEntry(f"{name} changed size while it was read")
    except OSError as exc:
        raise CorruptEntry(f"{name} cannot be read ({exc})") from None
    finally:
        os.close(fd)
    if check_hash and fast_hash(memoryview(buf)[: st.st_size]) != expected:
        raise CorruptEntry(f"{name} does not match its {FILE_HASH} in the manifest")
    return buf


def entry_signature(path: Path) -> tuple:
    """The identity (:class:`~vllm_safelora.fsutil.FileIdentity`: dev, inode, size, mtime, ctime) of
    an entry's directory and of each of its files by name, manifest excluded (its mtime records
    use); () if it cannot be stat'ed. The directory's own times move when a file is added,
    removed or renamed in it, so an unchanged signature also means the same set of files."""
    try:
        return (
            FileIdentity.of(os.stat(path)),
            *(
                (e.name, FileIdentity.of(e.stat(follow_symlinks=False)))
                for e in sorted(os.scandir(path), key=lambda e: e.name)
                if e.name != MANIFEST_NAME
            ),
        )
    except OSError:
        return ()


def signature_racy(signature: tuple, taken_at_ns: int) -> bool:
    """A signature taken too soon after a write to prove anything later (git's racily clean rule)."""
    if not signature:
        return True
    return signature[0].racy(taken_at_ns) or any(ident.racy(taken_at_ns) for _, ident in signature[1:])


def entry_path_in(path: Path | str, entries_dir: Path) -> Path | None:
    """``path`` resolved, if it names an entry directory (entries/<64 hex>) under ``entries_dir``."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):  # a client's path a tenant is swapping under realpath (EINVAL), or NUL
        return None
    if real.parent != Path(os.path.realpath(entries_dir)) or not HEX64.fullmatch(real.name):
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
