"""SaLoRA-style (post-hoc) safety-feature projection, after SaLoRA (arXiv 2501.01765).

SaLoRA *trains* LoRA behind a fixed safety module C_s = I - V_s V_s^T, where
V_s (d_out x r_s, orthonormal) spans the top directions of the module's outputs
X W^T on harmful prompts with refusal responses. Training is out of reach at
load time; what transfers is the post-hoc projection of a finished adapter

    lora_B' = lora_B - V_s (V_s^T lora_B)        (lora_A unchanged, shapes and rank unchanged)

so the adapter can no longer move the module's output inside the
safety-feature directions: V_s^T lora_B' = 0, hence V_s^T (s B' A) x = 0 for
every input. It is a load-time approximation of the paper's method, not SaLoRA
itself, and data-dependent (V_s comes from a prompt set): it is labelled
"SaLoRA-style (post-hoc)" everywhere and should be measured, not assumed.

V_s is built offline from the aligned model by ``vllm-safelora build-bank
--safety-prompts FILE.jsonl [--safety-rank 32]`` and stored beside the bank
(:mod:`vllm_safelora.bank.safety_features`); a bank without it makes this policy
raise :class:`BankError`. The features' digest (``features_id``) is folded into
this policy's id, so new features give new cache entries.

Config: ``{kind: salora-style, rank: null}`` (``rank``: use only the top-k stored
directions). The kind says "-style" on purpose.

Reported per module: ``salora_removed_fraction`` = ||V_s V_s^T dW||_F / ||dW||_F
(exact, r x r traces with G = A A^T), plus the Safe LoRA diagnostics of the
input (approx C) for comparability. A module whose ||V_s^T B||_F is at most
1e-6 ||B||_F is left byte-identical (already orthogonal; projecting would only
add round-off). The projection runs in float32 and is cast back to the
adapter's dtype, so for float16/bfloat16 adapters V_s^T B' = 0 holds only to
that dtype's precision.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..adapters import LoraAdapter, LoraModule
from ..bank import AlignmentBank
from ..projection import ProjectionKind, trace_with_gram
from ..report import ModuleReport
from .base import Policy, PolicyConfig, PolicyResult, analyze_adapter, module_report, pdst_term_for

LABEL = "SaLoRA-style (post-hoc)"
_NEGLIGIBLE = 1e-6


class SaLoRAConfig(PolicyConfig):
    """SaLoRA-style (post-hoc) projection: lora_B' = lora_B - V_s V_s^T lora_B."""

    kind: Literal["salora-style"] = "salora-style"
    rank: int | None = Field(
        None, ge=1, description="use only the top-k stored safety directions per module (default: all stored, r_s)"
    )

    def uses_safety_features(self) -> bool:
        return True


def safety_overlap(Vs: torch.Tensor, module: LoraModule) -> float:
    """||V_s V_s^T dW||_F / ||dW||_F in float64 via r x r traces (the scale s cancels)."""
    A = module.lora_A.to(device=Vs.device, dtype=torch.float64)
    B = module.lora_B.to(device=Vs.device, dtype=torch.float64)
    G = A @ A.T
    inside = Vs.double().T @ B  # (V_s^T B): ||V_s V_s^T B A||^2 = tr((V_s^T B)^T (V_s^T B) G)
    num = max(trace_with_gram(inside, inside, G), 0.0)
    den = max(trace_with_gram(B, B, G), 0.0)
    return math.sqrt(num / den) if den > 0 else 0.0


def salora_project(Vs: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B - V_s (V_s^T B) in float32 on V_s's device."""
    B32 = B.to(device=Vs.device, dtype=torch.float32)
    return B32 - Vs @ (Vs.T @ B32)


class SaLoRAPolicy(Policy):
    name = "salora-style"

    def __init__(self, config: SaLoRAConfig):
        self.config = config

    def validate_bank(self, bank: AlignmentBank) -> None:
        bank.require_safety_features(f"the {LABEL} policy")

    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult:
        features = bank.require_safety_features(f"the {LABEL} policy")
        k = self.config.rank
        tensors = dict(adapter.tensors)
        reports: list[ModuleReport] = []
        changed = 0
        fractions: list[float] = []
        analyses = analyze_adapter(adapter, bank, ProjectionKind.APPROX)
        for name, module in adapter.modules.items():
            Vs = features[name].to(torch.float32)
            if k is not None:
                Vs = Vs[:, :k]
            a = analyses[name]

            fraction = safety_overlap(Vs, module)
            fractions.append(fraction)

            B64 = module.lora_B.to(device=Vs.device, dtype=torch.float64)
            VtB = Vs.double().T @ B64
            project = float(torch.linalg.vector_norm(VtB)) > _NEGLIGIBLE * float(torch.linalg.vector_norm(B64))
            final_B = module.lora_B
            if project:
                final_B = salora_project(Vs, module.lora_B).to(device="cpu", dtype=module.lora_B.dtype)
                tensors[module.b_key] = final_B
                changed += 1
            reports.append(
                module_report(
                    bank,
                    module,
                    a,
                    projected=project,
                    pdst_term=pdst_term_for(a, module.lora_B, final_B),
                    salora_removed_fraction=fraction,
                )
            )
        sf = bank.manifest.safety_features
        used = f"top {k}" if k is not None else "all stored"
        notes = [
            f"{LABEL}: lora_B' = lora_B - V_s V_s^T lora_B with {used} safety directions per module "
            f"(features {bank.features_id}, r_s = {sf.rank if sf else '?'}, {sf.samples if sf else '?'} samples); "
            f"{changed}/{len(reports)} module(s) projected; removed share of the update "
            + (f"mean {sum(fractions) / len(fractions):.3f}, max {max(fractions):.3f}" if fractions else "n/a")
        ]
        return PolicyResult(tensors=tensors, modules=reports, changed=changed > 0, notes=notes)
