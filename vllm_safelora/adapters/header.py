"""The safetensors header, checked by the reader itself before safetensors sees the bytes.

This module imports no vLLM.
"""

from __future__ import annotations

import math
import struct
from typing import Any
from collections.abc import Mapping

import torch

from ..errors import RefusalReason
from ..errors import Problems
from .limits import ReadLimits
from .names import WEIGHTS_FILE
from .validate import parse_json

# Every safetensors dtype code as torch holds it: the one map the reader and the
# worker's verified read use (element sizes come from the torch dtype).
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
# The codes we accept for LoRA weights: projection runs in float32 and casts back,
# so only these three round-trip.
FLOAT_CODES = {code: SAFETENSORS_DTYPES[code] for code in ("F16", "BF16", "F32")}


def header_length(data: bytes) -> int | None:
    """The length field of a safetensors file, or None if the header cannot fit in ``data``."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    return n if n <= len(data) - 8 else None


def check_safetensors_header(data: bytes, limits: ReadLimits, problems: Problems) -> dict[str, Any] | None:
    """Validate the header ourselves: size, tensor count, JSON, duplicates, dtypes, offsets, sizes.

    Ordered so that the cost of a refusal is bounded before anything is parsed: the
    length field against ``max_header_bytes``, then a count of ``"data_offsets"`` keys
    (a C-speed byte count; escaped quotes inside names cannot fake it) against
    ``max_tensors``, and only then ``json.loads`` of at most ``max_header_bytes``.
    """
    if len(data) < 8:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} is {len(data)} bytes, too short for safetensors")
        return None
    n = header_length(data)
    if n is None:
        n = struct.unpack("<Q", data[:8])[0]
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

    header = parse_json(
        raw, f"{WEIGHTS_FILE} header", 4, RefusalReason.MALFORMED_TENSORS, problems, object_pairs_hook=no_duplicates
    )
    if header is None:
        return None
    if duplicates:
        problems.add(
            RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header names tensors twice: {sorted(set(duplicates))[:5]}"
        )
        return None
    if not isinstance(header, dict):
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header is not a JSON object")
        return None
    if len(header) - ("__metadata__" in header) > limits.max_tensors:
        problems.add(RefusalReason.TOO_LARGE, _too_many_tensors(len(header) - ("__metadata__" in header), limits))
        return None
    return header if _check_header_entries(header, len(data) - 8 - n, limits, problems) else None


def _header_within_bounds(data: bytes, limits: ReadLimits, problems: Problems) -> bool:
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


def refuse_oversized_header(head: bytes, size: int, *, limits: ReadLimits, adapter: str) -> None:
    """While reading: refuse a header over the bounds before the rest of the file is read.
    (A length field past the end of the file is left to the parser, which calls it malformed.)"""
    if len(head) >= 8 and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        problems = Problems(adapter)
        _header_within_bounds(head, limits, problems)
        problems.raise_if_any()


def _too_many_tensors(count: int, limits: ReadLimits) -> str:
    return (
        f"{WEIGHTS_FILE} holds {count} tensors; a LoRA of the served model has at most {limits.max_tensors} "
        "(lora_A and lora_B per module)"
    )


def _check_header_entries(header: Mapping[str, Any], data_len: int, limits: ReadLimits, problems: Problems) -> bool:
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return False
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if (
            not isinstance(dtype, str)
            or dtype not in SAFETENSORS_DTYPES
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(offsets) != 2
        ):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return False
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, *offsets]):
            problems.add(
                RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has negative or non-integer sizes"
            )
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
        expected = elements * SAFETENSORS_DTYPES[dtype].itemsize
        if not (begin <= end <= data_len) or end - begin != expected:
            problems.add(
                RefusalReason.MALFORMED_TENSORS,
                f"{WEIGHTS_FILE}: tensor {name} offsets {offsets} do not fit its shape {shape} ({dtype}) "
                f"inside {data_len} data bytes",
            )
            return False
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensors {n0} and {n1} overlap")
            return False
    return True


# ---------------------------------------------------------------------------
