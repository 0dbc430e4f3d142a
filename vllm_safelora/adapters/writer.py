"""Write a patched adapter: serialised to bytes (and hashed) first, then written atomically.

This module imports no vLLM.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..fsutil import atomic_directory, fast_hash, fsync_dir
from .modules import LoraAdapter, content_hash
from .names import CONFIG_FILE, WEIGHTS_FILE, is_canonical_name


@dataclass(frozen=True)
class SerializedAdapter:
    """A patched adapter as bytes, hashed before anything touches the disk."""

    config_bytes: bytes
    weights_bytes: bytes
    extra_files: dict[str, bytes]

    @property
    def content_hash(self) -> str:
        return content_hash(self.config_bytes, self.weights_bytes)


def serialize_adapter(
    config_bytes: bytes, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> SerializedAdapter:
    """The adapter's files as bytes; the config is kept byte-for-byte.

    Only canonical tensor names are written (:func:`canonical_name`): one name per
    module and half, so the served file holds exactly the tensors that were checked.
    """
    odd = [k for k in tensors if not is_canonical_name(k)]
    if odd:
        raise ValueError(f"the adapter writer writes only canonical LoRA tensor names, got {sorted(odd)[:3]}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **dict(metadata or {})}
    return SerializedAdapter(config_bytes, save_safetensors_bytes(cpu, metadata=meta), {})


def unchanged_files(adapter: LoraAdapter) -> SerializedAdapter:
    """An adapter no policy changed, as it is served: byte for byte as uploaded when every
    tensor already has its canonical name, else the same tensors re-written under them."""
    if adapter.canonical_names:
        return SerializedAdapter(adapter.config_bytes, adapter.weights_bytes, {})
    return serialize_adapter(adapter.config_bytes, adapter.tensors, adapter.metadata)


def config_excluding_modules(config_bytes: bytes, modules: list[str] | tuple[str, ...]) -> bytes:
    """adapter_config.json with ``modules`` (pruned: their tensors were removed) added to ``exclude_modules``.

    vLLM ignores the key (it loads LoRA weights for the tensors present, and a module
    without tensors runs no LoRA); PEFT honours it, so loading the pruned adapter
    leaves those modules without a LoRA layer instead of initialising fresh
    (possibly random, with init_lora_weights=false) weights for them. An existing
    regex ``exclude_modules`` is kept as an alternative of the new pattern.
    """
    if not modules:
        return config_bytes
    config = json.loads(config_bytes.decode("utf-8"))
    existing = config.get("exclude_modules")
    if isinstance(existing, str) and existing:
        config["exclude_modules"] = "|".join([f"(?:{existing})", *(re.escape(m) for m in modules)])
    else:
        listed = list(existing or [])
        config["exclude_modules"] = listed + [m for m in modules if m not in listed]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_adapter_dir(out_dir: Path, adapter: SerializedAdapter, *, overwrite: bool = False) -> Path:
    """Write all files into a temp dir beside ``out_dir``, fsync, then rename into place."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_adapter_files(tmp, adapter)
    return Path(out_dir)


def write_adapter_files(directory: Path, adapter: SerializedAdapter) -> dict[str, str]:
    """Write into an existing (temporary) directory and fsync every file.

    Returns {file name: blake3 of the bytes written}, hashed from memory, so whoever
    records the files (the cache's seal) need not read them back or fsync them again.
    """
    files = {CONFIG_FILE: adapter.config_bytes, WEIGHTS_FILE: adapter.weights_bytes, **adapter.extra_files}
    hashes = {}
    for fname, data in files.items():
        with open(directory / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        hashes[fname] = fast_hash(data)
    fsync_dir(directory)
    return hashes
