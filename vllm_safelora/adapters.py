"""Read and validate a PEFT LoRA adapter directory; write a patched one.

Adapters are tenant uploads, so the reader trusts nothing: it reads each file
once, with a byte limit, hashes exactly the bytes it parses, checks the
safetensors header itself before handing the bytes to safetensors (which
never unpickles anything), and collects every problem it finds into one
:class:`AdapterRefused`. Pickle files (``adapter_model.bin``) are refused by
name and never opened.

This module imports no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import AdapterRefused, RefusalReason
from .fsutil import atomic_directory, fsync_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

# safetensors dtype codes we accept for LoRA weights: projection runs in
# float32 and casts back, so only these three round-trip.
_FLOAT_CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ELEMENT_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER_BYTES = 16 << 20
_MAX_CONFIG_BYTES = 1 << 20
# rank_pattern / alpha_pattern keys: module names or suffixes only (see _check_pattern).
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_MAX_PATTERN_KEYS = 1024

# PEFT names: base_model.model.<module path>.lora_A.weight (adapter name stripped on save).
_LORA_KEY = re.compile(r"^(?P<prefix>base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what a tenant can make the server read."""

    max_bytes: int = 2 << 30
    max_rank: int | None = None


@dataclass(frozen=True)
class LoraModule:
    name: str
    """Module path as in the base checkpoint, e.g. model.layers.0.self_attn.q_proj."""
    a_key: str
    b_key: str
    lora_A: torch.Tensor
    """r x d_in"""
    lora_B: torch.Tensor
    """d_out x r"""
    rank: int
    alpha: float
    scale: float
    """s = alpha / r, or alpha / sqrt(r) with use_rslora"""

    @property
    def d_out(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.lora_A.shape[1])


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    config_bytes: bytes
    weights_bytes: bytes
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]
    content_hash: str
    nbytes: int
    dtype: torch.dtype
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None


def content_hash(config_bytes: bytes, weights_bytes: bytes) -> str:
    """Identity of an adapter's content: what is served, independent of its name or path."""
    h = hashlib.sha256()
    h.update(b"adapter_config.json\0" + hashlib.sha256(config_bytes).digest())
    h.update(b"adapter_model.safetensors\0" + hashlib.sha256(weights_bytes).digest())
    return h.hexdigest()


class _Problems:
    """Collects every problem, then refuses once with the first reason (peft_helper style)."""

    def __init__(self, adapter: str):
        self.adapter = adapter
        self.items: list[tuple[RefusalReason, str]] = []

    def add(self, reason: RefusalReason, detail: str) -> None:
        self.items.append((reason, detail))

    def raise_if_any(self) -> None:
        if self.items:
            details = "; ".join(d for _, d in self.items[:20])
            if len(self.items) > 20:
                details += f"; and {len(self.items) - 20} more problems"
            raise AdapterRefused(self.items[0][0], details, adapter=self.adapter)


# ---------------------------------------------------------------------------
# Files


def _read_regular_file(path: Path, limit: int, adapter: str, confine_to: Path | None) -> tuple[bytes, os.stat_result]:
    real = Path(os.path.realpath(path))
    if confine_to is not None:
        root = Path(os.path.realpath(confine_to))
        if real != root and root not in real.parents:
            raise AdapterRefused(
                RefusalReason.INVALID_NAME, f"{path.name} is a link pointing outside the adapter source", adapter
            )
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AdapterRefused(RefusalReason.NOT_FOUND, f"cannot open {path.name}: {exc.strerror}", adapter) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterRefused(RefusalReason.INVALID_NAME, f"{path.name} is not a regular file", adapter)
        if st.st_size > limit:
            raise AdapterRefused(
                RefusalReason.TOO_LARGE, f"{path.name} is {st.st_size} bytes, the limit is {limit}", adapter
            )
        chunks, total = [], 0
        while True:
            block = os.read(fd, min(1 << 24, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:
                raise AdapterRefused(RefusalReason.TOO_LARGE, f"{path.name} grew past the limit of {limit} bytes while read", adapter)
        data = b"".join(chunks)
        if len(data) != st.st_size:
            raise AdapterRefused(
                RefusalReason.CHANGED_WHILE_READING, f"{path.name} changed size while it was read", adapter
            )
        return data, st
    finally:
        os.close(fd)


def _same_file(before: os.stat_result, path: Path) -> bool:
    try:
        now = os.stat(os.path.realpath(path))
    except OSError:
        return False
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (
        before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns,
    )


def _parse_config(data: bytes, problems: _Problems) -> dict[str, Any] | None:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} is not valid JSON ({exc})")
        return None
    if not isinstance(config, dict):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} must hold a JSON object")
        return None
    return config


def _check_config(config: Mapping[str, Any], problems: _Problems) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.add(RefusalReason.NOT_LORA, f"{CONFIG_FILE}: peft_type is {peft_type!r}, only 'LORA' is served")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: lora_alpha must be a finite number, got {alpha!r}")
    if config.get("use_dora"):
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        problems.add(
            RefusalReason.UNSUPPORTED_FEATURE,
            f"{CONFIG_FILE}: modules_to_save={config['modules_to_save']!r} trains full modules that cannot be projected",
        )
    if config.get("fan_in_fan_out"):
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: fan_in_fan_out=true (Conv1D layers) is not supported")
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: trained biases are not supported (bias must be 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {key} must be an object")
        elif value:
            _check_pattern(key, value, problems)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: base_model_name_or_path must be a string")


def _check_pattern(key: str, pattern: Mapping[str, Any], problems: _Problems) -> None:
    """rank_pattern / alpha_pattern keys are matched as regexes (PEFT's rule); a tenant's regex
    could backtrack for hours (``(.|.)*Z``), so only module names / suffixes are accepted."""
    if len(pattern) > _MAX_PATTERN_KEYS:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {key} has {len(pattern)} entries (at most {_MAX_PATTERN_KEYS})")
        return
    for k, v in pattern.items():
        if not _PATTERN_KEY.fullmatch(k):
            problems.add(
                RefusalReason.INVALID_CONFIG,
                f"{CONFIG_FILE}: {key} key {k[:80]!r} must be a module name or suffix (letters, digits, '_', '.', '-', "
                "at most 256 characters); regular-expression operators are not accepted",
            )
            return
        if key == "rank_pattern":
            bad = isinstance(v, bool) or not isinstance(v, int) or v < 1
        else:
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        if bad:
            what = "a positive integer" if key == "rank_pattern" else "a finite number"
            problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {key}[{k!r}] must be {what}, got {v!r}")
            return


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: a key matches a module whose path ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def _check_safetensors_header(data: bytes, problems: _Problems) -> dict[str, Any] | None:
    """Validate the header ourselves: size, JSON, duplicates, dtypes, offsets."""
    if len(data) < 8:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} is {len(data)} bytes, too short for safetensors")
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        problems.add(
            RefusalReason.MALFORMED_TENSORS,
            f"{WEIGHTS_FILE} header claims {n} bytes but the file has {len(data) - 8} after the length field",
        )
        return None
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                duplicates.append(k)
            seen[k] = v
        return seen

    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header is not valid JSON ({exc})")
        return None
    if duplicates:
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header names tensors twice: {sorted(set(duplicates))[:5]}")
        return None
    if not isinstance(header, dict):
        problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} header is not a JSON object")
        return None
    data_len = len(data) - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return None
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ELEMENT_SIZE or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has an invalid header entry")
            return None
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, *offsets]):
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensor {name} has negative or non-integer sizes")
            return None
        begin, end = offsets
        expected = math.prod(shape) * _ELEMENT_SIZE[dtype]
        if not (begin <= end <= data_len) or end - begin != expected:
            problems.add(
                RefusalReason.MALFORMED_TENSORS,
                f"{WEIGHTS_FILE}: tensor {name} offsets {offsets} do not fit its shape {shape} ({dtype}) "
                f"inside {data_len} data bytes",
            )
            return None
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.add(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE}: tensors {n0} and {n1} overlap")
            return None
    return header


# ---------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's files as read (once, within limits), before any parsing."""

    path: Path
    name: str
    config_bytes: bytes
    weights_bytes: bytes

    @property
    def content_hash(self) -> str:
        return content_hash(self.config_bytes, self.weights_bytes)


def read_adapter_files(
    path: Path,
    *,
    name: str | None = None,
    limits: ReadLimits = ReadLimits(),
    confine_to: Path | None = None,
) -> AdapterFiles:
    """Read an adapter directory's two files within the byte limits, parsing nothing.

    Split from :func:`parse_adapter` so that a caller can recognise content it has
    already refused (by :attr:`AdapterFiles.content_hash`) before paying for parsing.
    """
    path = Path(path)
    who = name or str(path)
    if not path.is_dir():
        raise AdapterRefused(RefusalReason.NOT_FOUND, f"{path} is not a directory", who)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not os.path.lexists(config_path):
        raise AdapterRefused(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} is missing", who)
    pickles = [p for p in PICKLE_FILES if os.path.lexists(path / p)]
    if not os.path.lexists(weights_path):
        if pickles:
            raise AdapterRefused(
                RefusalReason.PICKLE_ONLY,
                f"only pickle weights ({', '.join(pickles)}) were found; pickle is never loaded here. "
                "Re-save the adapter with save_pretrained(..., safe_serialization=True)",
                who,
            )
        raise AdapterRefused(RefusalReason.MISSING_TENSOR, f"{WEIGHTS_FILE} is missing", who)
    if pickles:
        raise AdapterRefused(
            RefusalReason.PICKLE_ONLY,
            f"{', '.join(pickles)} sits beside {WEIGHTS_FILE}; which weights are meant is ambiguous. "
            "Upload only the safetensors file",
            who,
        )

    config_bytes, config_stat = _read_regular_file(config_path, _MAX_CONFIG_BYTES, who, confine_to)
    weights_bytes, weights_stat = _read_regular_file(weights_path, limits.max_bytes, who, confine_to)
    if not (_same_file(config_stat, config_path) and _same_file(weights_stat, weights_path)):
        raise AdapterRefused(
            RefusalReason.CHANGED_WHILE_READING,
            "the adapter's files were replaced while they were read; upload it again",
            who,
        )
    return AdapterFiles(path=path, name=who, config_bytes=config_bytes, weights_bytes=weights_bytes)


def read_adapter(
    path: Path,
    *,
    name: str | None = None,
    limits: ReadLimits = ReadLimits(),
    confine_to: Path | None = None,
) -> LoraAdapter:
    """Read, validate and hash a PEFT LoRA adapter directory, or refuse it.

    ``name`` is how errors name the adapter (its served name); ``confine_to``
    is a directory every file must resolve into (the source's root).
    """
    return parse_adapter(read_adapter_files(path, name=name, limits=limits, confine_to=confine_to), limits=limits)


def parse_adapter(files: AdapterFiles, *, limits: ReadLimits = ReadLimits()) -> LoraAdapter:
    """Validate and parse files read by :func:`read_adapter_files`, or refuse them."""
    path, who = files.path, files.name
    config_bytes, weights_bytes = files.config_bytes, files.weights_bytes
    problems = _Problems(who)
    config = _parse_config(config_bytes, problems)
    if config is not None:
        _check_config(config, problems)
    problems.raise_if_any()
    assert config is not None

    header = _check_safetensors_header(weights_bytes, problems)
    problems.raise_if_any()
    assert header is not None
    for tname, info in header.items():
        if tname != "__metadata__" and info["dtype"] not in _FLOAT_CODES:
            problems.add(RefusalReason.BAD_DTYPE, f"tensor {tname} has dtype {info['dtype']}; LoRA weights must be F16, BF16 or F32")
    problems.raise_if_any()
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors' own validation
        raise AdapterRefused(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} cannot be parsed: {exc}", who) from exc
    metadata = header.get("__metadata__") or {}

    modules = _pair_modules(tensors, config, limits, problems)
    problems.raise_if_any()
    dtypes = {t.dtype for t in tensors.values()}
    return LoraAdapter(
        path=path,
        config=config,
        config_bytes=config_bytes,
        weights_bytes=weights_bytes,
        tensors=tensors,
        modules=modules,
        content_hash=content_hash(config_bytes, weights_bytes),
        nbytes=len(config_bytes) + len(weights_bytes),
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
    )


def _pair_modules(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], limits: ReadLimits, problems: _Problems
) -> dict[str, LoraModule]:
    halves: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _LORA_KEY.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"tensor {key} is a DoRA magnitude; DoRA is not supported")
            elif "lora_embedding" in key:
                problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"tensor {key} is an embedding LoRA; only linear modules are served")
            else:
                problems.add(RefusalReason.UNEXPECTED_TENSOR, f"tensor {key} is not a LoRA A/B weight")
            continue
        halves.setdefault(m["module"], {})[m["which"]] = key
    if not halves and not problems.items:
        problems.add(RefusalReason.EMPTY, f"{WEIGHTS_FILE} holds no LoRA weights")

    r_default = config.get("r")
    alpha_default = config.get("lora_alpha", r_default)
    rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            problems.add(RefusalReason.MISSING_TENSOR, f"module {module} has no {missing} weight")
            continue
        A, B = tensors[pair["A"]], tensors[pair["B"]]
        if A.dim() != 2 or B.dim() != 2:
            problems.add(RefusalReason.SHAPE_MISMATCH, f"module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be 2-D")
            continue
        if A.numel() == 0 or B.numel() == 0:
            problems.add(RefusalReason.EMPTY, f"module {module} has zero-sized weights {tuple(A.shape)} / {tuple(B.shape)}")
            continue
        r = int(A.shape[0])
        if B.shape[1] != r:
            problems.add(RefusalReason.RANK_MISMATCH, f"module {module}: lora_A has rank {r}, lora_B has rank {B.shape[1]}")
            continue
        declared = _pattern_value(config.get("rank_pattern"), module, r_default)
        if declared != r:
            problems.add(RefusalReason.RANK_MISMATCH, f"module {module}: weights have rank {r}, {CONFIG_FILE} declares {declared}")
            continue
        if limits.max_rank is not None and r > limits.max_rank:
            problems.add(RefusalReason.RANK_TOO_LARGE, f"module {module} has rank {r}, the server allows at most {limits.max_rank}")
            continue
        if A.dtype != B.dtype:
            problems.add(RefusalReason.BAD_DTYPE, f"module {module}: lora_A is {A.dtype}, lora_B is {B.dtype}")
            continue
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            problems.add(RefusalReason.NON_FINITE, f"module {module} has NaN or Inf values")
            continue
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = LoraModule(
            name=module, a_key=pair["A"], b_key=pair["B"], lora_A=A, lora_B=B, rank=r, alpha=alpha, scale=scale
        )
    return modules


# ---------------------------------------------------------------------------
# Writer


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
    """The adapter's files as bytes; the config is kept byte-for-byte."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **dict(metadata or {})}
    return SerializedAdapter(config_bytes, save_safetensors_bytes(cpu, metadata=meta), {})


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


def write_adapter_files(directory: Path, adapter: SerializedAdapter) -> None:
    """Write into an existing (temporary) directory and fsync every file."""
    files = {CONFIG_FILE: adapter.config_bytes, WEIGHTS_FILE: adapter.weights_bytes, **adapter.extra_files}
    for fname, data in files.items():
        with open(directory / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(directory)
