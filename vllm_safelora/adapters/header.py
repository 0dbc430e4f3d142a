"""The safetensors header, checked by the reader itself before safetensors sees the bytes.

This module imports no vLLM.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping

import torch

from ..errors import RefusalReason
from .limits import ReadLimits, _Problems
from .names import WEIGHTS_FILE
from .validate import _parse_json

# safetensors dtype codes we accept for LoRA weights: projection runs in
# float32 and casts back, so only these three round-trip.
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ELEMENT_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def _check_safetensors_header(data: bytes, limits: ReadLimits, problems: _Problems) -> dict[str, Any] | None:
    """Validate the header ourselves: size, tensor count, JSON, duplicates, dtypes, offsets, sizes.

    Ordered so that the cost of a refusal is bounded before anything is parsed: the
    length field against ``max_header_bytes``, then a count of ``"data_offsets"`` keys
    (a C-speed byte count; escaped quotes inside names cannot fake it) against
    ``max_tensors``, and only then ``json.loads`` of at most ``max_header_bytes``.
    """
    if len(data) < 8:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} is {len(data)} bytes, too short for safetensors")
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        problems.add(
            RefusalReason.MALFORMED_TENSORS,
            f"{WEIGHTS_FILE} header claims {n} bytes but the file has {len(data) - 8} after the length field",
        )
        return None
    if not _header_within_bounds(data, limits, problems):
        return None
    raw = data[8 : 8 + n]
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                duplicates.append(k)
            seen[k] = v
        return seen

    header = _parse_json(raw, f"{WEIGHTS_FILE} header", 4, RefusalReason.MALFORMED_TENSORS, problems,
                         object_pairs_hook=no_duplicates)
    if header is None:
        return None
    if duplicates:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header names tensors twice: {sorted(set(duplicates))[:5]}")
        return None
    if not isinstance(header, dict):
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header is not a JSON object")
        return None
    if len(header) - ("__metadata__" in header) > limits.max_tensors:
        problems.add(RefusalReason.TOO_LARGE, _too_many_tensors(len(header) - ("__metadata__" in header), limits))
        return None
    return header if _check_header_entries(header, len(data) - 8 - n, limits, problems) else None


def _header_within_bounds(data: bytes, limits: ReadLimits, problems: _Problems) -> bool:
    """The header's size and tensor count, from its length field and a byte count: no parsing."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > limits.max_header_bytes:
        problems.add(
            RefusalReason.TOO_LARGE,
            f"{WEIGHTS_FILE} header is {n} bytes, the limit is {limits.max_header_bytes} "
            f"(room for {limits.max_tensors} tensors, as many as a LoRA of the served model can have)",
        )
        return False
    count = data[8 : 8 + n].count(b'"data_offsets"')
    if count > limits.max_tensors:
        problems.add(RefusalReason.TOO_LARGE, _too_many_tensors(count, limits))
        return False
    return True


def _refuse_oversized_header(head: bytes, size: int, *, limits: ReadLimits, adapter: str) -> None:
    """While reading: refuse a header over the bounds before the rest of the file is read.
    (A length field past the end of the file is left to the parser, which calls it malformed.)"""
    if len(head) >= 8 and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        problems = _Problems(adapter)
        _header_within_bounds(head, limits, problems)
        problems.raise_if_any()


def _too_many_tensors(count: int, limits: ReadLimits) -> str:
    return (
        f"{WEIGHTS_FILE} holds {count} tensors; a LoRA of the served model has at most {limits.max_tensors} "
        "(lora_A and lora_B per module)"
    )


def _check_header_entries(header: Mapping[str, Any], data_len: int, limits: ReadLimits, problems: _Problems) -> bool:
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return False
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ELEMENT_SIZE or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return False
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, *offsets]):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has negative or non-integer sizes")
            return False
        elements = math.prod(shape)
        if elements > limits.max_tensor_elements:
            problems.add(
                RefusalReason.TOO_LARGE,
                f"{WEIGHTS_FILE}: tensor {name} has {elements} elements {shape}; a LoRA tensor of the served model "
                f"has at most {limits.max_tensor_elements}",
            )
            return False
        begin, end = offsets
        expected = elements * _ELEMENT_SIZE[dtype]
        if not (begin <= end <= data_len) or end - begin != expected:
            problems.add(
                RefusalReason.MALFORMED_TENSORS,
                f"{WEIGHTS_FILE}: tensor {name} offsets {offsets} do not fit its shape {shape} ({dtype}) "
                f"inside {data_len} data bytes",
            )
            return False
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensors {n0} and {n1} overlap")
            return False
    return True


# ---------------------------------------------------------------------------
