"""The policy interface: an adapter and a bank in, the transformed adapter and its report out.

A new policy is a new file with a config class and an ``apply``; nothing in
the vLLM integration changes.

Contract of ``Policy.apply(adapter, bank) -> PolicyResult``:

* ``tensors`` is the complete tensor dict of the adapter to serve. A policy
  replaces tensors (a projected lora_B keeps its name, shape and dtype) or
  removes a module's lora_A and lora_B together (pruning); it never adds any.
* ``modules`` holds one :class:`ModuleReport` per module of the *input*
  adapter, pruned ones included (``pruned=True``).
* ``changed`` is True exactly when the served adapter differs from the input.
* Policies are pure: they read the adapter and the bank and write nothing.

Policies compose (:mod:`.chain`): each step sees the previous step's tensors
through :func:`adapter_view`, a :class:`LoraAdapter` whose modules are re-paired
from those tensors.

This package imports no vLLM.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from collections.abc import Collection, Mapping

import torch
from pydantic import BaseModel, ConfigDict

from ..adapters import LoraAdapter, LoraModule
from ..bank import AlignmentBank
from ..projection import ModuleAnalysis, ModuleInput, ProjectionKind, analyze_modules
from ..report import ModuleReport


class PolicyConfig(BaseModel):
    """Base for every policy's settings; frozen and hashable into a stable id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str

    def uses_safety_features(self) -> bool:
        """Does the policy read the bank's safety features (V_s)? Then they are part of its identity."""
        return False

    def policy_id(self, bank: AlignmentBank | None = None) -> str:
        """Stable digest of the settings: part of the cache key.

        For a policy that uses data stored beside the bank that the bank_id does
        not cover (the SaLoRA-style safety features), pass the bank: its
        ``features_id`` is folded in, so rebuilding V_s changes the id (and thus
        the cache key) while the bank_id stays tied to ``bank.safetensors``.
        Without such data, ``policy_id(bank) == policy_id()``.
        """
        payload: dict = self.model_dump(mode="json")
        if bank is not None and self.uses_safety_features():
            payload = {"policy": payload, "safety_features": bank.features_id}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyResult:
    tensors: dict[str, torch.Tensor]
    """The adapter's tensors after the policy (same names; projected ones replaced, pruned ones absent)."""
    modules: list[ModuleReport]
    changed: bool
    notes: list[str]
    pruned: tuple[str, ...] = field(default=())
    """Modules whose lora_A/lora_B were removed (also marked ``pruned`` in ``modules``)."""


class Policy(abc.ABC):
    name: str

    @abc.abstractmethod
    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult: ...

    def validate_bank(self, bank: AlignmentBank) -> None:  # noqa: B027 (optional hook: most policies need nothing)
        """Raise BankError when the bank lacks what the policy needs (call it at start-up: fail closed)."""


# ---------------------------------------------------------------------------
# Helpers shared by the policies


def adapter_view(adapter: LoraAdapter, tensors: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """``adapter`` as it would read with ``tensors`` as its weights.

    Modules whose lora_A and lora_B are both still present keep their rank,
    alpha and scale and get the new tensors; modules missing from ``tensors``
    (pruned) disappear. Identity fields (path, config, content hash, bytes)
    stay those of the upload: a view is an in-memory intermediate, never
    serialised as such.
    """
    modules = {
        name: dataclasses.replace(m, lora_A=tensors[m.a_key], lora_B=tensors[m.b_key])
        for name, m in adapter.modules.items()
        if m.a_key in tensors and m.b_key in tensors
    }
    return dataclasses.replace(adapter, tensors=dict(tensors), modules=modules)


def pdst_term_for(analysis: ModuleAnalysis, lora_B_in: torch.Tensor, lora_B_final: torch.Tensor | None) -> float:
    """The reference's Pdst term 1 / (1 + ||lora_B_final - C lora_B_in||_F), for any final lora_B.

    ``analysis`` is the module's score against ``lora_B_in``. ``lora_B_final=None`` means the
    module was pruned (the served update is 0): the distance is ||C B||_F. A kept module
    (``lora_B_final is lora_B_in``) gives 1 / (1 + ||C B - B||_F), a module served as C B
    gives 1, exactly as :func:`vllm_safelora.projection.pdst_term`; only another final
    lora_B (SaLoRA-style) costs C B itself.
    """
    if lora_B_final is None:
        distance = analysis.score.projected_B_norm
    elif lora_B_final is lora_B_in:
        distance = analysis.score.distance_B
    else:
        CB = analysis.projected_B.to(torch.float64)
        distance = float(torch.linalg.vector_norm(lora_B_final.to(CB.device, torch.float64) - CB))
    return 1.0 / (1.0 + distance)


def lora_flops_per_token(adapter: LoraAdapter, without: Collection[str] = ()) -> int:
    """LoRA FLOPs per token: sum over modules of 2 r (d_in + d_out) (x A^T, then (x A^T) B^T).

    ``without``: modules left out (pruned), for the compute of the adapter as served.
    """
    return sum(2 * m.rank * (m.d_in + m.d_out) for name, m in adapter.modules.items() if name not in without)


def analyze_adapter(adapter: LoraAdapter, bank: AlignmentBank, kind: ProjectionKind) -> dict[str, ModuleAnalysis]:
    """Score every module of the adapter against the bank: one pass over each U, batched per shape."""
    items = []
    for name, module in adapter.modules.items():
        sub = bank.get(name)
        assert sub is not None, f"{name} not in bank: check_compatible must run first"
        items.append(ModuleInput(name, sub, module.lora_A, module.lora_B, module.scale))
    analyses = analyze_modules(items, kind)
    return {name: analyses[name] for name in adapter.modules}


def module_report(
    bank: AlignmentBank, module: LoraModule, analysis: ModuleAnalysis, *, projected: bool, pdst_term: float, **extra
) -> ModuleReport:
    """The report row every policy writes; ``extra`` holds the policy's own fields."""
    meta = bank.manifest.module(module.name)
    return ModuleReport(
        module=module.name,
        cosine=analysis.score.cosine_rounded,
        cosine_raw=analysis.score.cosine,
        projected=projected,
        pdst_term=pdst_term,
        relative_distance=analysis.score.relative_distance,
        update_norm=analysis.score.update_norm,
        rank=module.rank,
        scale=module.scale,
        shape=(module.d_out, module.d_in),
        bank_error_bound=meta.approx_error_bound if meta else 0.0,
        **extra,
    )
