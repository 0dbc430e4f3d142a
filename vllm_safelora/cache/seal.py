"""Sealing a freshly built entry: hash and fsync its files, then write its manifest.

A build writes plain files into a temp directory; :func:`seal_entry` makes them
read-only, records each file's blake3 and size in ``cache_entry.json`` and fsyncs
everything, so the directory can be renamed into ``entries/`` complete and verified.

A build that hashed and fsynced the bytes it wrote (the adapter writer does) passes
those hashes as ``written``: those files are neither read back nor fsynced again.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from collections.abc import Mapping

from ..fsutil import fast_hash_file, fsync_dir, fsync_file
from .entry import FILE_HASH, FORMAT_VERSION, MANIFEST_NAME, CacheKey


def seal_entry(tmp: Path, key: CacheKey, written: Mapping[str, str] | None = None) -> None:
    """Hash and fsync what build wrote into ``tmp``, then write and fsync the manifest.

    ``written``: file name -> blake3 of the bytes the build wrote into it and fsynced.
    """
    written = dict(written or {})
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
        digest = written.get(name)
        if digest is None:
            digest = fast_hash_file(fpath, follow_symlinks=False)
            fsync_file(fpath)
        files[name] = {FILE_HASH: digest, "size": st.st_size}
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
