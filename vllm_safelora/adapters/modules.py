"""An adapter as modules: tensor names mapped as the served vLLM maps them, lora_A and
lora_B paired per module, each module checked; :class:`LoraModule` and :class:`LoraAdapter`.

This module imports no vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import blake3
import torch

from ..errors import RefusalReason
from ..fsutil import fast_hash
from .bounds import update_problems, all_finite
from ..errors import Problems
from .limits import ReadLimits
from .names import CONFIG_FILE, WEIGHTS_FILE, canonical_name, parse_lora_name
from .validate import pattern_value


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
    """Identity of an adapter's content: what is served, independent of its name or path.

    blake3 (64 lowercase hex) over each file's blake3, tagged with its name. Part of the
    cache key: changing how it is computed needs a new cache FORMAT_VERSION.
    """
    h = blake3.blake3()
    h.update(b"adapter_config.json\0" + bytes.fromhex(fast_hash(config_bytes)))
    h.update(b"adapter_model.safetensors\0" + bytes.fromhex(fast_hash(weights_bytes)))
    return h.hexdigest()


@dataclass(frozen=True)
class _Slot:
    """Where the served vLLM puts one tensor."""

    module: str
    """vLLM's module name (after its weights mapper): two tensors with one (module, which) collide."""
    peft_module: str
    """The name before mapping: the bank's module name and what rank/alpha patterns match (as in vLLM)."""
    which: str
    """"A" or "B"."""


def map_tensor_names(names: list[str], limits: ReadLimits, problems: Problems) -> dict[str, _Slot]:
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


def _slot_for(name: str, limits: ReadLimits, problems: Problems) -> _Slot | None:
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
        problems.add(
            RefusalReason.UNSUPPORTED_FEATURE, f"tensor {name} is an embedding LoRA; only linear modules are served"
        )
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


def pair_modules(
    tensors: Mapping[str, torch.Tensor],
    slots: Mapping[str, _Slot],
    config: Mapping[str, Any],
    limits: ReadLimits,
    problems: Problems,
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
            problems.add(
                RefusalReason.MISSING_TENSOR,
                f"module {slots[next(iter(pair.values()))].peft_module} has no {missing} weight",
            )
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
    name: str, A: torch.Tensor, B: torch.Tensor, config: Mapping[str, Any], limits: ReadLimits, problems: Problems
) -> LoraModule | None:
    """One module's checks, in the order that makes later ones meaningful; None if refused."""
    if A.dim() != 2 or B.dim() != 2:
        problems.add(
            RefusalReason.SHAPE_MISMATCH,
            f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be 2-D",
        )
        return None
    if A.numel() == 0 or B.numel() == 0:
        problems.add(RefusalReason.EMPTY, f"module {name} has zero-sized weights {tuple(A.shape)} / {tuple(B.shape)}")
        return None
    r = int(A.shape[0])
    if B.shape[1] != r:
        problems.add(RefusalReason.RANK_MISMATCH, f"module {name}: lora_A has rank {r}, lora_B has rank {B.shape[1]}")
        return None
    declared = pattern_value(config.get("rank_pattern"), name, config.get("r"))
    if declared != r:
        problems.add(
            RefusalReason.RANK_MISMATCH, f"module {name}: weights have rank {r}, {CONFIG_FILE} declares {declared}"
        )
        return None
    if limits.max_rank is not None and r > limits.max_rank:
        problems.add(
            RefusalReason.RANK_TOO_LARGE, f"module {name} has rank {r}, the server allows at most {limits.max_rank}"
        )
        return None
    if A.dtype != B.dtype:
        problems.add(RefusalReason.BAD_DTYPE, f"module {name}: lora_A is {A.dtype}, lora_B is {B.dtype}")
        return None
    if not (all_finite(A) and all_finite(B)):
        problems.add(RefusalReason.NON_FINITE, f"module {name} has NaN or Inf values")
        return None
    # vLLM's rule (PEFTHelper.get_rank_and_scaling): patterns match the unmapped module name.
    alpha = float(pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    overflow = update_problems(name, A, B, scale, limits)
    for detail in overflow:
        problems.add(RefusalReason.UPDATE_OVERFLOW, detail)
    if overflow:
        return None
    return LoraModule(
        name=name,
        a_key=canonical_name(name, "A"),
        b_key=canonical_name(name, "B"),
        lora_A=A,
        lora_B=B,
        rank=r,
        alpha=alpha,
        scale=scale,
    )


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
        problems += [f"after the policy, {p}" for p in update_problems(m.name, A, B, m.scale, adapter.limits)]
    return problems
