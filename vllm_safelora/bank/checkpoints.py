"""Streaming access to a model checkpoint's safetensors tensors.

A checkpoint is a local directory of safetensors shards, or a Hugging Face hub
id resolved through huggingface_hub (offline from the local cache when
HF_HUB_OFFLINE=1). Tensors are read one at a time (memory-mapped by
safetensors), so building a bank never holds two whole models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import BankError

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """Where each tensor of a checkpoint lives."""

    ref: str
    """What the user named: a local path or a hub id."""
    directory: Path
    shards: dict[str, Path]
    """tensor name -> shard file"""

    def names(self) -> list[str]:
        return sorted(self.shards)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.shards[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.shards[name]), framework="pt") as f:
            return f.get_tensor(name)


def resolve_checkpoint(ref: str, *, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint by local path or hub id, without loading any tensor."""
    path = Path(ref).expanduser()
    if path.is_dir():
        directory = path.resolve()
    elif path.exists():
        raise BankError(f"checkpoint '{ref}' is a file; give the model directory")
    else:
        directory = _download_from_hub(ref, revision)
    return Checkpoint(ref=ref, directory=directory, shards=_index_shards(directory, ref))


def _download_from_hub(ref: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once, when its constants
    # module is first imported (transformers, peft and vLLM import it early); read
    # them again here so that settings made after that import are honoured.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        local = snapshot_download(
            repo_id=ref,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=["*.safetensors", INDEX_FILE, "config.json"],
        )
    except HFValidationError as exc:
        raise BankError(f"checkpoint '{ref}' is neither a local directory nor a valid hub id: {exc}") from exc
    except Exception as exc:  # network, auth, not cached while offline
        raise BankError(
            f"checkpoint '{ref}' is not a local directory and could not be fetched from the hub "
            f"({type(exc).__name__}: {exc}). Offline? Set HF_HUB_OFFLINE=1 and make sure the model "
            "is in the local hub cache, or pass a local directory."
        ) from exc
    return Path(local)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _index_shards(directory: Path, ref: str) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise BankError(f"checkpoint '{ref}': {index} is not a valid safetensors index ({exc})") from exc
        shards = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in shards.values() if not p.is_file()})
        if missing:
            raise BankError(f"checkpoint '{ref}': {INDEX_FILE} names shard files that are missing: {missing[:5]}")
        return shards
    shards: dict[str, Path] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BankError(f"checkpoint '{ref}' ({directory}) has no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name in shards:
                    raise BankError(f"checkpoint '{ref}': tensor {name} appears in two shards")
                shards[name] = file
    return shards


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class TensorHasher:
    """sha256 over (name, dtype, shape, bytes) of the tensors actually used."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, t: torch.Tensor) -> None:
        self._h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        self._h.update(tensor_bytes(t))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def same_model_ref(a: str, b: str) -> bool:
    """True when two references plainly name the same model (string or real path)."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.realpath(pa) == os.path.realpath(pb)
    return False
