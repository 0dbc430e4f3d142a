"""Which model is this? A content fingerprint of a checkpoint's weights.

A bank protects one aligned model. Names do not identify it: the same weights
are served as a hub id, an absolute path, a relative path, a symlink or a copy.
The bank therefore records a fingerprint of the aligned model's tensors and a
server's ``--model`` is accepted when its weights have the same fingerprint.

The fingerprint is a sha256 over every tensor of the checkpoint, sorted by
name: ``name|dtype|shape|nbytes`` and then its bytes. Two modes:

``full``    all bytes of every tensor. Proves the weights are identical; costs
            one read of the whole checkpoint (the README states what it measured).
``sample``  the same header line per tensor, then 16 chunks of 4 KiB at evenly
            spaced offsets of its bytes (the first and last included; the whole
            tensor when it is smaller than that). Reads at most 64 KiB per tensor,
            so a 7B model costs milliseconds. Any fine-tune, re-quantisation,
            other dtype or other architecture changes it; a deliberate edit of
            bytes between the sampled chunks does not: use ``full`` where the
            model directory itself is not trusted.

Bytes are read straight from the safetensors files by the offsets in their
headers (no torch, no copy of a tensor), and the result does not depend on how
the checkpoint is split into shards. Nothing here downloads: a hub id counts
only when the model is already in the local hub cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

FingerprintMode = Literal["sample", "full"]
FINGERPRINT_MODES: tuple[str, ...] = ("sample", "full")
SAMPLE_CHUNKS = 16
SAMPLE_CHUNK_BYTES = 4096
_READ = 1 << 22
_MAX_HEADER = 100 << 20  # safetensors' own limit


class ModelFingerprint(BaseModel):
    mode: FingerprintMode = Field(description="sample: 16 x 4 KiB per tensor; full: every byte")
    sha256: str
    tensors: int = Field(description="tensors in the checkpoint")
    bytes_total: int = Field(description="bytes of tensor data in the checkpoint")
    bytes_hashed: int = Field(description="bytes actually read for the fingerprint")


class FingerprintError(Exception):
    """The checkpoint's weights cannot be read (no safetensors, bad header, I/O error)."""


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> header entry, offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FingerprintError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise FingerprintError(f"{path} has a {n}-byte safetensors header, over the {_MAX_HEADER} limit")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise FingerprintError(f"{path} has an unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise FingerprintError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, OSError) as exc:
            raise FingerprintError(f"{index} is not a valid safetensors index ({exc})") from exc
        return sorted({directory / shard for shard in weight_map.values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FingerprintError(f"{directory} has no *.safetensors files")
    return files


def _sample_offsets(nbytes: int) -> list[tuple[int, int]]:
    """(start, length) of the chunks sampled from a tensor of ``nbytes`` bytes."""
    if nbytes <= SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES:
        return [(0, nbytes)]
    last = nbytes - SAMPLE_CHUNK_BYTES
    return [(last * i // (SAMPLE_CHUNKS - 1), SAMPLE_CHUNK_BYTES) for i in range(SAMPLE_CHUNKS)]


def fingerprint_directory(directory: Path, mode: FingerprintMode = "sample") -> ModelFingerprint:
    """Fingerprint the safetensors weights in a local model directory."""
    if mode not in FINGERPRINT_MODES:
        raise ValueError(f"fingerprint mode must be one of {FINGERPRINT_MODES}, got {mode!r}")
    directory = Path(directory)
    located: dict[str, tuple[Path, int, dict]] = {}
    for file in _shard_files(directory):
        try:
            header, data_start = _read_header(file)
        except OSError as exc:
            raise FingerprintError(f"cannot read {file}: {exc}") from exc
        for name, entry in header.items():
            if name in located:
                raise FingerprintError(f"tensor {name} appears in two shards of {directory}")
            located[name] = (file, data_start, entry)
    h = hashlib.sha256()
    total = hashed = 0
    handles: dict[Path, object] = {}
    try:
        for name in sorted(located):
            file, data_start, entry = located[name]
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                dtype, shape = str(entry["dtype"]), [int(d) for d in entry["shape"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise FingerprintError(f"{file}: bad header entry for {name} ({exc})") from exc
            nbytes = end - begin
            h.update(f"{name}|{dtype}|{shape}|{nbytes}\n".encode())
            f = handles.get(file) or handles.setdefault(file, open(file, "rb"))  # noqa: SIM115 (closed with the others)
            spans = [(0, nbytes)] if mode == "full" else _sample_offsets(nbytes)
            for start, length in spans:
                f.seek(data_start + begin + start)
                remaining = length
                while remaining:
                    chunk = f.read(min(_READ, remaining))
                    if not chunk:
                        raise FingerprintError(f"{file} is truncated inside tensor {name}")
                    h.update(chunk)
                    remaining -= len(chunk)
                hashed += length
            total += nbytes
    except OSError as exc:
        raise FingerprintError(f"cannot read the weights in {directory}: {exc}") from exc
    finally:
        for f in handles.values():
            f.close()
    return ModelFingerprint(
        mode=mode, sha256=h.hexdigest(), tensors=len(located), bytes_total=total, bytes_hashed=hashed
    )


def local_model_dir(ref: str) -> Path | None:
    """The local directory holding ``ref``'s weights: a directory, or a hub id already in the hub cache.

    Never downloads (adapters name base models too, and a tenant must not make
    the server fetch anything). None when there is no local copy.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=ref,
            local_files_only=True,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            allow_patterns=["*.safetensors", "model.safetensors.index.json", "config.json"],
        )
    except Exception:  # not cached, not a valid repo id, hub library quirks: no local copy
        return None
    return Path(local).resolve()


# Start-up and every adapter's base-model check ask about the same few
# directories: remember each answer while the shards' size and mtime stay the same.
_memo: dict[tuple, ModelFingerprint] = {}
_memo_lock = threading.Lock()
_MEMO_MAX = 64


def _stat_key(directory: Path, mode: str) -> tuple:
    try:
        files = _shard_files(directory)
        return (str(directory), mode, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except (OSError, FingerprintError):
        return ()


def fingerprint_model(ref: str, mode: FingerprintMode) -> ModelFingerprint | None:
    """Fingerprint of the model ``ref`` names if a local copy exists, else None (memoised)."""
    directory = local_model_dir(ref)
    if directory is None:
        return None
    key = _stat_key(directory, mode)
    with _memo_lock:
        if key and key in _memo:
            return _memo[key]
    try:
        fp = fingerprint_directory(directory, mode)
    except FingerprintError:
        return None
    if key:
        with _memo_lock:
            if len(_memo) >= _MEMO_MAX:
                _memo.clear()
            _memo[key] = fp
    return fp
