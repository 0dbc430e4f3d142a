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

import functools
import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

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
# rank_pattern / alpha_pattern keys: module names or suffixes only (see _check_pattern).
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_MAX_PATTERN_KEYS = 1024

_PEFT_PREFIX = "base_model.model."
# What the header of one tensor may cost: its name (module paths are < 150 characters),
# dtype, shape and offsets. __metadata__ gets a fixed allowance on top.
HEADER_BYTES_PER_TENSOR = 512
HEADER_METADATA_BYTES = 64 << 10
# Accumulation headroom of the update bound (see _update_problems): one output of
# x @ (s B A)^T sums d_in products; with |x| <= ACTIVATION_HEADROOM the sum stays
# finite in the served dtype when max|s B A| <= finfo.max / (ACTIVATION_HEADROOM * d_in).
ACTIVATION_HEADROOM = 16.0
# Rows of B per block when the exact max|s B A| is needed: blocks of <= 2^20 float64 elements.
_EXACT_BLOCK_ELEMENTS = 1 << 20

NameParser = Callable[[str], "tuple[str, bool]"]
"""vLLM's tensor-name parser: name -> (module, is_lora_a); raises ValueError where vLLM does."""
ConfigCheck = Callable[[Mapping[str, Any]], "list[str]"]
"""Extra adapter_config.json validation (vLLM's PEFTHelper at serve time): problems, or []."""
ModuleFilter = Callable[[str], bool]
"""Whether the served vLLM applies LoRA to a module (its --lora-target-modules)."""


def parse_lora_name(name: str) -> tuple[str, bool]:
    """vLLM 0.32's ``vllm.lora.utils.parse_fine_tuned_lora_name`` without a weights mapper, line for line.

    Kept vLLM-free so the reader works offline; at serve time the integration hands
    the reader vLLM's own function (``ReadLimits.parse_name``), and tests prove the two
    equal on hostile names. vLLM's quirks are kept on purpose, since they decide which
    module a tensor lands on: *every* ``base_model.model.`` is removed (not only the
    prefix), a name that still starts with it afterwards loses two more parts,
    ``*.score.weight`` / ``*.classifier.bias`` name full modules, and embedding
    tensors have no ``.weight`` suffix.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name.replace(_PEFT_PREFIX, "")
    start_index = 2 if name.startswith(_PEFT_PREFIX) else 0
    parts = name.split(".")
    if (parts[-1] == "weight" or parts[-1] == "bias") and len(parts) >= 2:
        if parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            return ".".join(parts[start_index:-2]), parts[-2] == "lora_A"
        if parts[-2] in ("score", "classifier"):
            return parts[-2], False
    if parts[-1] == "lora_embedding_A" or parts[-1] == "lora_embedding_B":
        return ".".join(parts[start_index:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def canonical_name(module: str, which: str) -> str:
    """The one name the writer uses for a module's lora_A / lora_B (PEFT's own layout)."""
    return f"{_PEFT_PREFIX}{module}.lora_{which}.weight"


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what a tenant can make the server read, and how the served vLLM reads it.

    The defaults are vLLM-free and generous (offline tools, tests); the server uses
    ``vllm_safelora.integration.vllm_rules.read_limits_for``, which derives every
    bound from the served model and hands in vLLM's own parser and config check.
    """

    max_bytes: int = 2 << 30
    """Size of adapter_model.safetensors (served: also bounded by the model's largest possible LoRA)."""
    max_rank: int | None = None
    """vLLM's --max-lora-rank: r, every rank_pattern value and every tensor's rank."""
    max_config_bytes: int = 1 << 20
    """Size of adapter_config.json (real ones are a few KB; rank/alpha patterns add ~100 B per key)."""
    max_config_depth: int = 16
    """JSON nesting of adapter_config.json (real ones nest 2-3 deep)."""
    max_tensors: int = 8192
    """Tensors in one adapter (served: 2 per LoRA module the model has, x 2 slack)."""
    max_header_bytes: int = 8192 * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES
    """Size of the safetensors JSON header, checked before it is parsed (served: from max_tensors)."""
    max_tensor_elements: int = 1 << 28
    """Elements of one tensor (served: max_rank x the model's widest projection x 4 for fused ones)."""
    max_lora_alpha: float = 4096.0
    """|lora_alpha| and every |alpha_pattern| value; keeps s = alpha / r (or / sqrt r) sane."""
    max_update_abs: float = 65536.0
    """Cap on max |s B A| in any dtype, so a finite update cannot blow up the next layer's norm."""
    serve_dtype: torch.dtype | None = None
    """dtype vLLM runs LoRA weights in (lora_dtype); None: each adapter's own dtype."""
    parse_name: NameParser = field(default=parse_lora_name)
    """How the served vLLM maps tensor names to modules (vLLM's parser with the model's weights mapper)."""
    module_served: ModuleFilter | None = None
    """vLLM's deployment filter (--lora-target-modules); None: every module."""
    check_config: ConfigCheck | None = None
    """The served vLLM's own adapter_config.json validation (PEFTHelper); None: only the reader's mirror of it."""


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
    canonical_names: bool = True
    """Whether the uploaded file already names every tensor canonically (then it can be served byte for byte)."""
    limits: ReadLimits = field(default_factory=ReadLimits)
    """The limits it was read with: a policy's output is held to the same (:func:`changed_update_problems`)."""

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


def _read_regular_file(
    path: Path, limit: int, adapter: str, confine_to: Path | None,
    head: tuple[int, Callable[[bytes, int], None]] | None = None,
) -> tuple[bytes, os.stat_result]:
    """The file's bytes within ``limit``. ``head`` = (n, check): the first n bytes are read
    first and ``check(head, file_size)`` may refuse them before the rest is read (a huge file with a hostile
    header costs n bytes, not the file)."""
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
        if head is not None:
            first = _read_up_to(fd, min(head[0], limit + 1))
            head[1](first, st.st_size)
            chunks, total = [first], len(first)
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


def _read_up_to(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.read(fd, n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _same_file(before: os.stat_result, path: Path) -> bool:
    try:
        now = os.stat(os.path.realpath(path))
    except OSError:
        return False
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (
        before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns,
    )


def _parse_json(data: bytes, what: str, max_depth: int, reason: RefusalReason, problems: _Problems, **kw) -> Any:
    """json.loads that refuses instead of raising: RecursionError ('[' * 10**5) is not a ValueError."""
    try:
        value = json.loads(data.decode("utf-8"), **kw)
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(reason, f"{what} is not valid JSON ({exc})")
        return None
    except RecursionError:
        problems.add(reason, f"{what} nests JSON too deeply")
        return None
    if _json_depth(value, max_depth) > max_depth:
        problems.add(reason, f"{what} nests JSON more than {max_depth} levels deep")
        return None
    return value


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, walked iteratively and cut off just past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_config(data: bytes, limits: ReadLimits, problems: _Problems) -> dict[str, Any] | None:
    config = _parse_json(data, CONFIG_FILE, limits.max_config_depth, RefusalReason.INVALID_CONFIG, problems)
    if config is None:
        return None
    if not isinstance(config, dict):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} must hold a JSON object")
        return None
    return config


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_config(config: Mapping[str, Any], limits: ReadLimits, problems: _Problems) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.add(RefusalReason.NOT_LORA, f"{CONFIG_FILE}: peft_type is {peft_type!r}, only 'LORA' is served")
    _check_scaling_fields(config, limits, problems)
    _check_vllm_features(config, problems)
    if config.get("fan_in_fan_out"):
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: fan_in_fan_out=true (Conv1D layers) is not supported")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    if limits.check_config is not None and not problems.items:
        # The served vLLM's own validation (PEFTHelper), so the list follows vLLM.
        for problem in limits.check_config(config):
            problems.add(RefusalReason.VLLM_UNSUPPORTED, f"{CONFIG_FILE}: {problem}")


def _check_scaling_fields(config: Mapping[str, Any], limits: ReadLimits, problems: _Problems) -> None:
    """r, lora_alpha, use_rslora, rank_pattern, alpha_pattern: what s = alpha / r is made of.

    vLLM requires r and lora_alpha (PEFTHelper has no default for them); PEFT always saves both.
    """
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
    elif limits.max_rank is not None and r > limits.max_rank:
        problems.add(RefusalReason.RANK_TOO_LARGE, f"{CONFIG_FILE}: r is {r}, the server allows at most {limits.max_rank}")
    if "lora_alpha" not in config:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: lora_alpha is missing (vLLM requires it)")
    else:
        _check_alpha("lora_alpha", config["lora_alpha"], limits, problems)
    if not isinstance(config.get("use_rslora", False), bool):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {key} must be an object")
        elif value:
            _check_pattern(key, value, limits, problems)


def _check_alpha(where: str, alpha: Any, limits: ReadLimits, problems: _Problems) -> bool:
    if not _is_number(alpha):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {where} must be a finite number, got {alpha!r}")
        return False
    if abs(alpha) > limits.max_lora_alpha:
        problems.add(
            RefusalReason.UPDATE_OVERFLOW,
            f"{CONFIG_FILE}: {where} is {alpha!r}; this server allows |alpha| <= {limits.max_lora_alpha:g} "
            "(the update is scaled by alpha / r)",
        )
        return False
    return True


# init_lora_weights values that only set initial weights (vLLM's PEFTHelper._init_is_supported).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def _check_vllm_features(config: Mapping[str, Any], problems: _Problems) -> None:
    """The PEFT features vLLM 0.32's PEFTHelper refuses, mirrored so offline tools refuse them too.

    At serve time ``ReadLimits.check_config`` runs PEFTHelper itself; this mirror is the
    vLLM-free floor and may only be stricter (tests/test_adapters.py checks both).
    """
    refuse = lambda what: problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: {what}")  # noqa: E731
    if "target_modules" not in config:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: target_modules is missing (vLLM requires it)")
    if config.get("use_dora"):
        refuse("DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save={config['modules_to_save']!r} trains full modules that cannot be projected")
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        refuse("trained biases are not supported (bias must be 'none', lora_bias false)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        refuse(
            f"init_lora_weights={init!r} (PiSSA, OLoRA, CorDA, LoftQ) changes the base weights when PEFT loads it; "
            "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion"
        )
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            refuse(f"{what} ({key}) is not supported by vLLM")


def _check_pattern(key: str, pattern: Mapping[str, Any], limits: ReadLimits, problems: _Problems) -> None:
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
        if key == "alpha_pattern":
            if not _check_alpha(f"alpha_pattern[{k!r}]", v, limits, problems):
                return
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: rank_pattern[{k!r}] must be a positive integer, got {v!r}")
            return
        # vLLM checks every rank_pattern value against --max-lora-rank, used or not.
        if limits.max_rank is not None and v > limits.max_rank:
            problems.add(
                RefusalReason.RANK_TOO_LARGE,
                f"{CONFIG_FILE}: rank_pattern[{k!r}] is {v}, the server allows at most {limits.max_rank}",
            )
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

    config_bytes, config_stat = _read_regular_file(config_path, limits.max_config_bytes, who, confine_to)
    weights_bytes, weights_stat = _read_regular_file(
        weights_path, limits.max_bytes, who, confine_to,
        head=(8 + limits.max_header_bytes, functools.partial(_refuse_oversized_header, limits=limits, adapter=who)),
    )
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
    """Validate and parse files read by :func:`read_adapter_files`, or refuse them.

    Every tensor name is mapped to its module the way the served vLLM maps it, and
    refused unless each module gets exactly one lora_A and one lora_B, *before* any
    tensor is materialised. The returned adapter's tensors are keyed by their
    canonical names (:func:`canonical_name`), which is all the writer writes.
    """
    path, who = files.path, files.name
    config_bytes, weights_bytes = files.config_bytes, files.weights_bytes
    problems = _Problems(who)
    config = _parse_config(config_bytes, limits, problems)
    if config is not None:
        _check_config(config, limits, problems)
    problems.raise_if_any()
    assert config is not None

    header = _check_safetensors_header(weights_bytes, limits, problems)
    problems.raise_if_any()
    assert header is not None
    names = [k for k in header if k != "__metadata__"]
    for tname in names:
        if header[tname]["dtype"] not in _FLOAT_CODES:
            problems.add(RefusalReason.BAD_DTYPE, f"tensor {tname} has dtype {header[tname]['dtype']}; LoRA weights must be F16, BF16 or F32")
    slots = _map_tensor_names(names, limits, problems)
    problems.raise_if_any()
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors' own validation
        raise AdapterRefused(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} cannot be parsed: {exc}", who) from exc
    metadata = header.get("__metadata__") or {}

    modules = _pair_modules(tensors, slots, config, limits, problems)
    problems.raise_if_any()
    canonical = {canonical_name(slots[k].peft_module, slots[k].which): t for k, t in tensors.items()}
    dtypes = {t.dtype for t in tensors.values()}
    return LoraAdapter(
        path=path,
        config=config,
        config_bytes=config_bytes,
        weights_bytes=weights_bytes,
        tensors=canonical,
        modules=modules,
        content_hash=content_hash(config_bytes, weights_bytes),
        nbytes=len(config_bytes) + len(weights_bytes),
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        canonical_names=set(canonical) == set(tensors),
        limits=limits,
    )


@dataclass(frozen=True)
class _Slot:
    """Where the served vLLM puts one tensor."""

    module: str
    """vLLM's module name (after its weights mapper): two tensors with one (module, which) collide."""
    peft_module: str
    """The name before mapping: the bank's module name and what rank/alpha patterns match (as in vLLM)."""
    which: str
    """"A" or "B"."""


def _map_tensor_names(names: list[str], limits: ReadLimits, problems: _Problems) -> dict[str, _Slot]:
    """Map every tensor name as the served vLLM will; refuse names it cannot map and collisions.

    vLLM fills its modules in file order and the last tensor it meets for a module
    wins, so an adapter with two names for one module (``base_model.model.X.lora_A.weight``
    and ``X.lora_A.weight``) would have one checked here and the other served.
    """
    slots: dict[str, _Slot] = {}
    for name in names:
        slot = _slot_for(name, limits, problems)
        if slot is not None:
            slots[name] = slot
    owners: dict[tuple[str, str], list[str]] = {}
    for name, slot in slots.items():
        owners.setdefault((slot.module, slot.which), []).append(name)
    for (module, which), tensors in sorted(owners.items()):
        if len(tensors) > 1:
            problems.add(
                RefusalReason.DUPLICATE_MODULE,
                f"tensors {sorted(tensors)} all load into lora_{which} of module {module} (vLLM would serve whichever "
                "it reads last); keep exactly one tensor per module and half",
            )
    return slots


def _slot_for(name: str, limits: ReadLimits, problems: _Problems) -> _Slot | None:
    if "lora_magnitude_vector" in name:
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"tensor {name} is a DoRA magnitude; DoRA is not supported")
        return None
    try:
        module, is_a = limits.parse_name(name)
    except Exception:  # vLLM's parser raises ValueError; its weights mapper may raise anything
        problems.add(
            RefusalReason.UNEXPECTED_TENSOR,
            f"tensor {name} is not a LoRA A/B weight vLLM can map to a module (names end in .lora_A.weight / .lora_B.weight)",
        )
        return None
    parts = name.split(".")
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"tensor {name} is an embedding LoRA; only linear modules are served")
        return None
    if not (len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")):
        problems.add(
            RefusalReason.UNSUPPORTED_FEATURE,
            f"tensor {name} is a full '{module}' module (modules_to_save), which cannot be projected",
        )
        return None
    which = "A" if is_a else "B"
    peft_module = parse_lora_name(name)[0]
    if not module or not peft_module:
        problems.add(RefusalReason.UNEXPECTED_TENSOR, f"tensor {name} names no module")
        return None
    if limits.parse_name(canonical_name(peft_module, which)) != (module, is_a):
        problems.add(
            RefusalReason.UNEXPECTED_TENSOR,
            f"tensor {name} would land on another module under its canonical name {canonical_name(peft_module, which)}; "
            "save the adapter with PEFT's save_pretrained",
        )
        return None
    if limits.module_served is not None and not limits.module_served(module):
        problems.add(
            RefusalReason.UNKNOWN_MODULE,
            f"tensor {name}: this server applies no LoRA to module {module} (see its --lora-target-modules)",
        )
        return None
    return _Slot(module=module, peft_module=peft_module, which=which)


def _pair_modules(
    tensors: Mapping[str, torch.Tensor],
    slots: Mapping[str, _Slot],
    config: Mapping[str, Any],
    limits: ReadLimits,
    problems: _Problems,
) -> dict[str, LoraModule]:
    halves: dict[str, dict[str, str]] = {}
    for key, slot in slots.items():
        halves.setdefault(slot.module, {})[slot.which] = key
    if not halves and not problems.items:
        problems.add(RefusalReason.EMPTY, f"{WEIGHTS_FILE} holds no LoRA weights")
    modules: dict[str, LoraModule] = {}
    for served, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            problems.add(RefusalReason.MISSING_TENSOR, f"module {slots[next(iter(pair.values()))].peft_module} has no {missing} weight")
            continue
        if slots[pair["A"]].peft_module != slots[pair["B"]].peft_module:
            problems.add(
                RefusalReason.UNEXPECTED_TENSOR,
                f"lora_A ({pair['A']}) and lora_B ({pair['B']}) of module {served} come from different module names",
            )
            continue
        module = _module(slots[pair["A"]].peft_module, tensors[pair["A"]], tensors[pair["B"]], config, limits, problems)
        if module is not None:
            modules[module.name] = module
    return modules


def _module(
    name: str, A: torch.Tensor, B: torch.Tensor, config: Mapping[str, Any], limits: ReadLimits, problems: _Problems
) -> LoraModule | None:
    """One module's checks, in the order that makes later ones meaningful; None if refused."""
    if A.dim() != 2 or B.dim() != 2:
        problems.add(RefusalReason.SHAPE_MISMATCH, f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be 2-D")
        return None
    if A.numel() == 0 or B.numel() == 0:
        problems.add(RefusalReason.EMPTY, f"module {name} has zero-sized weights {tuple(A.shape)} / {tuple(B.shape)}")
        return None
    r = int(A.shape[0])
    if B.shape[1] != r:
        problems.add(RefusalReason.RANK_MISMATCH, f"module {name}: lora_A has rank {r}, lora_B has rank {B.shape[1]}")
        return None
    declared = _pattern_value(config.get("rank_pattern"), name, config.get("r"))
    if declared != r:
        problems.add(RefusalReason.RANK_MISMATCH, f"module {name}: weights have rank {r}, {CONFIG_FILE} declares {declared}")
        return None
    if limits.max_rank is not None and r > limits.max_rank:
        problems.add(RefusalReason.RANK_TOO_LARGE, f"module {name} has rank {r}, the server allows at most {limits.max_rank}")
        return None
    if A.dtype != B.dtype:
        problems.add(RefusalReason.BAD_DTYPE, f"module {name}: lora_A is {A.dtype}, lora_B is {B.dtype}")
        return None
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        problems.add(RefusalReason.NON_FINITE, f"module {name} has NaN or Inf values")
        return None
    # vLLM's rule (PEFTHelper.get_rank_and_scaling): patterns match the unmapped module name.
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    overflow = _update_problems(name, A, B, scale, limits)
    for detail in overflow:
        problems.add(RefusalReason.UPDATE_OVERFLOW, detail)
    if overflow:
        return None
    return LoraModule(
        name=name, a_key=canonical_name(name, "A"), b_key=canonical_name(name, "B"), lora_A=A, lora_B=B,
        rank=r, alpha=alpha, scale=scale,
    )


def update_limit(dtype: torch.dtype, d_in: int, limits: ReadLimits) -> float:
    """The largest |entry| of s B A (and of lora_A) a module with ``d_in`` inputs may have in ``dtype``.

    One output of x @ (s B A)^T sums d_in products; with activations up to
    ACTIVATION_HEADROOM (16: inputs of LoRA'd projections are normalised hidden states,
    O(1) with outliers) the sum stays finite in ``dtype``. fp16 is the binding case
    (65504 / (16 d_in): 1.0 at d_in = 4096, 32 on the 128-wide test model); for bf16 and
    fp32 the dtype allows ~1e33, so ``max_update_abs`` (65536) caps it instead: an
    update of that size is already far outside any fine-tune (weights are O(0.01-1)),
    and larger finite ones overflow the next layer's norm (it squares them).
    """
    return min(limits.max_update_abs, torch.finfo(dtype).max / (ACTIVATION_HEADROOM * d_in))


def _update_problems(name: str, A: torch.Tensor, B: torch.Tensor, scale: float, limits: ReadLimits) -> list[str]:
    """Whether vLLM can run this module's update finitely, as it will run it.

    vLLM casts lora_A to its LoRA dtype and folds s into lora_B there
    (``LoRALayerWeights.optimize``: ``lora_b *= scaling``), so both must stay finite
    after that cast; x @ lora_A^T must not overflow (bounded by max|lora_A|); and
    the update s B A itself must stay within :func:`update_limit`. The cheap
    Cauchy-Schwarz bound |s (B A)_ij| <= |s| max_i ||B_i,:|| max_j ||A_:,j|| decides
    almost every adapter; the exact blockwise max runs only when the bound is over.
    """
    dtype = limits.serve_dtype or A.dtype
    served = f"{str(dtype).removeprefix('torch.')} (the dtype vLLM runs it in)"
    folded = B.to(dtype) * scale
    if not (torch.isfinite(A.to(dtype)).all() and torch.isfinite(folded).all()):
        return [
            f"module {name}: lora_A or s*lora_B (s = {scale:g}) is not finite in {served}; "
            "lower lora_alpha or the weights"
        ]
    limit = update_limit(dtype, int(A.shape[1]), limits)
    problems = []
    a_max = float(A.double().abs().max())
    if a_max > limit:
        problems.append(f"module {name}: |lora_A| reaches {a_max:.4g}; at most {limit:.4g} is safe in {served}")
    A64, B64 = A.double(), B.double()
    bound = abs(scale) * float(B64.norm(dim=1).max()) * float(A64.norm(dim=0).max())
    if bound > limit:
        exact = max_abs_update(A64, B64, scale)
        if exact > limit:
            problems.append(
                f"module {name}: the update s*B*A reaches {exact:.4g} (s = {scale:g}); at most {limit:.4g} is safe "
                f"in {served}. Lower lora_alpha or the weights"
            )
    return problems


def changed_update_problems(adapter: LoraAdapter, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The update checks again, on the modules a policy changed (``tensors``: its output).

    A projection can grow lora_B: C = V V^T / ||V||_F has eigenvalues up to ||V||_F, so
    an admitted update near the limit may leave the policy over it.
    """
    problems = []
    for m in adapter.modules.values():
        A, B = tensors.get(m.a_key), tensors.get(m.b_key)
        if A is None or B is None or (A is m.lora_A and B is m.lora_B):
            continue  # pruned or unchanged
        problems += [f"after the policy, {p}" for p in _update_problems(m.name, A, B, m.scale, adapter.limits)]
    return problems


def max_abs_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """Exact max |s B A| in float64, in row blocks of B so memory stays at ~8 MiB."""
    A64 = A.double()
    rows = max(1, _EXACT_BLOCK_ELEMENTS // max(1, int(A.shape[1])))
    best = 0.0
    for start in range(0, int(B.shape[0]), rows):
        best = max(best, float((B[start : start + rows].double() @ A64).abs().max()))
    return abs(scale) * best


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


def is_canonical_name(name: str) -> bool:
    try:
        module, is_a = parse_lora_name(name)
    except ValueError:
        return False
    return bool(module) and name == canonical_name(module, "A" if is_a else "B")


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


def write_adapter_files(directory: Path, adapter: SerializedAdapter) -> None:
    """Write into an existing (temporary) directory and fsync every file."""
    files = {CONFIG_FILE: adapter.config_bytes, WEIGHTS_FILE: adapter.weights_bytes, **adapter.extra_files}
    for fname, data in files.items():
        with open(directory / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(directory)
