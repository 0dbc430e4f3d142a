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
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

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


# ---------------------------------------------------------------- file identity
#
# Any write to a file, and any touch, utime or rename onto it, moves its ctime, which no
# user but root (setting the clock) can set. So once this process has hashed a file, an
# unchanged (dev, inode, size, mtime, ctime) means unchanged bytes, except for a write in
# the same timestamp tick as the hash ("racily clean", as git calls it): an identity whose
# times are not older than the hash by more than the granularity proves nothing, and the
# file is hashed again at its next use. Network file systems may not keep ctime (or report
# another host's clock): there the full check stays.

RACY_WINDOW_NS = 2_000_000_000
"""Coarser than any local file system's timestamp tick (ext4/xfs: one kernel jiffy; FAT: 2 s)."""

# mountinfo type names (or prefixes ending in ".") of file systems whose ctime is not trusted.
UNTRUSTED_CTIME_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "ceph",
    "glusterfs",
    "lustre",
    "gpfs",
    "afs",
    "virtiofs",
    "fuse",
    "fuse.",
    "fuseblk",
    "sshfs",
    "davfs",
    "s3fs",
)


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def racy(self, hashed_at_ns: int) -> bool:
        """Too close to the moment it was hashed for an unchanged identity to prove unchanged bytes."""
        return max(self.mtime_ns, self.ctime_ns) >= hashed_at_ns - RACY_WINDOW_NS


def filesystem_type(path: Path | str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the file system holding ``path`` (from mountinfo), or "unknown"."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, right.split()[0]
    except OSError:
        return "unknown"
    return fstype


def ctime_trusted(path: Path | str, mountinfo: str = "/proc/self/mountinfo") -> tuple[bool, str]:
    """Whether an unchanged identity may stand for unchanged bytes under ``path``, and its file system."""
    fstype = filesystem_type(path, mountinfo)
    untrusted = fstype == "unknown" or any(
        fstype == name or (name.endswith(".") and fstype.startswith(name)) for name in UNTRUSTED_CTIME_FILESYSTEMS
    )
    return not untrusted, fstype


_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}  # where glibc (< 2.28) has no wrapper


def exchange_paths(a: Path, b: Path) -> None:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``): a reader of
    either name sees the old entry or the new one, never neither (what replaces a non-empty directory)."""
    import ctypes
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    fa, fb = os.fsencode(str(a)), os.fsencode(str(b))
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(-100, fa, -100, fb, _RENAME_EXCHANGE)
    else:
        rc = libc.syscall(_SYS_RENAMEAT2[platform.machine()], -100, fa, -100, fb, _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))
