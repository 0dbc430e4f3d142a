"""vLLM reads the weights the worker guard verified: one read, hashed as it is read.

The worker guard (cache/worker_guard.py) reads an entry's ``adapter_model.safetensors`` once into
memory and checks its blake3 against the manifest (:func:`..cache.read_verified`).
While vLLM's ``LoRAModel.from_local_checkpoint`` runs for that entry on this thread,
its ``safetensors.safe_open`` of exactly that file is answered from those verified
bytes (tensors are views of them: no second read, no copy), so nothing can change the
weights between the check and vLLM's use. Any other ``safe_open`` (other files,
threads, callers) goes to safetensors unchanged.

The guard checks afterwards that vLLM did read the verified bytes (:attr:`Pending.served`);
if it read something else the load is refused.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import torch

from ..adapters import ReadLimits
from ..adapters.header import SAFETENSORS_DTYPES, check_safetensors_header, header_length
from ..errors import Problems

# The bytes were hashed against the entry's manifest; the header is still parsed by the
# reader's own checks (offsets in range, no overlaps), with bounds no entry can reach.
_ENTRY_LIMITS = ReadLimits(max_tensors=1 << 20, max_header_bytes=1 << 30, max_tensor_elements=1 << 40)

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


class VerifiedSafetensors:
    """What ``safetensors.safe_open(path, framework="pt")`` returns, over bytes in memory."""

    def __init__(self, buf):
        problems = Problems("cache entry")
        header = check_safetensors_header(buf, _ENTRY_LIMITS, problems)
        if header is None:
            raise ValueError("; ".join(detail for _, detail in problems.items))
        header = dict(header)
        self._metadata = header.pop("__metadata__", None)
        self._buf, self._base = buf, 8 + header_length(buf)
        self._header = header

    def __enter__(self) -> VerifiedSafetensors:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return sorted(self._header)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def get_tensor(self, name: str) -> torch.Tensor:
        meta = self._header[name]
        dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        shape = list(meta["shape"])
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._buf, dtype=dtype, count=count, offset=self._base + start)
        return flat.view(shape)


@dataclass
class Pending:
    path: str
    buf: object
    served: bool = False


class _SafetensorsShim:
    """Stands in for the ``safetensors`` module inside vLLM's lora_model module."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def safe_open(self, filename, framework="pt", device="cpu", *args, **kwargs):
        pending: Pending | None = getattr(_local, "pending", None)
        if (
            pending is not None
            and not args
            and not kwargs
            and framework in ("pt", "torch")
            and str(device) == "cpu"
            and os.path.realpath(filename) == pending.path
        ):
            pending.served = True
            return VerifiedSafetensors(pending.buf)
        return self._real.safe_open(filename, framework, device, *args, **kwargs)


def install() -> None:
    """Route vLLM's LoRA checkpoint reads through the shim (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from vllm.lora import lora_model

        if not isinstance(lora_model.safetensors, _SafetensorsShim):
            lora_model.safetensors = _SafetensorsShim(lora_model.safetensors)
        _installed = True


@contextlib.contextmanager
def serving(path: Path, buf) -> Iterator[Pending]:
    """While inside, this thread's ``safe_open(path)`` (in vLLM's lora_model) reads ``buf``."""
    pending = Pending(os.path.realpath(path), buf)
    previous = getattr(_local, "pending", None)
    _local.pending = pending
    try:
        yield pending
    finally:
        _local.pending = previous
