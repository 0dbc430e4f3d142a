"""Durable file writes and content hashes shared by the bank, the adapter writer and the cache.

Hashes: the bank's integrity check uses sha256 (its manifest format); the adapter load
path (adapter content hashes, cache entry manifests, the worker guard) uses blake3,
several times faster per byte (:func:`fast_hash`, :func:`fast_hash_file`).

``atomic_directory`` publishes a whole new directory; ``atomic_file`` (and
``replace_file``) one file inside an existing directory. Both fsync what they
write before it becomes visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import blake3

_HASH_CHUNK = 1 << 22
# One thread below this many bytes (thread start-up costs more than it saves).
_PARALLEL_HASH_BYTES = 1 << 24


def fast_hash(data: bytes | bytearray | memoryview) -> str:
    """blake3 (64 lowercase hex) of ``data``; large inputs are hashed on several threads."""
    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_HASH_BYTES else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


def fast_hash_file(path: Path, *, follow_symlinks: bool = True) -> str:
    """blake3 of a file's bytes, read in blocks."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with os.fdopen(os.open(path, flags), "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path, *, fsync: bool = False, follow_symlinks: bool = True) -> str:
    """sha256 of a file's bytes; ``fsync`` also flushes it to disk while it is open."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    h = hashlib.sha256()
    with os.fdopen(os.open(path, flags), "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_file(tmp: Path, dest: Path) -> None:
    """Flush ``tmp``, rename it over ``dest`` and flush the directory.

    Readers (and a restart after a crash) see the old ``dest`` or the complete
    new one, never a half-written file.
    """
    fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(Path(dest).parent)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success :func:`replace_file` it into place.

    On any failure the temp file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        replace_file(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir``; on success fsync it and rename it into place.

    Readers see the old directory or the complete new one, never a half-written
    one; on any failure the temp dir is removed and ``out_dir`` is untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The rename itself is only durable once the parent directory's entry is on disk.
    fsync_dir(out_dir.parent)
