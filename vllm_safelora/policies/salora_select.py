"""Selective SaLoRA-style projection: the safety-feature projection on chosen modules only.

SaLoRA-style (post-hoc) projection (:mod:`.salora`) applies lora_B' = (I - V_s V_s^T) lora_B
to *every* module. In the miniature that restores safety only by removing a large share of
every update, and the downstream task goes with it. Which modules carry the harmful
behaviour is a per-adapter question, so this policy projects only the k modules (or those
past a threshold) that score highest on

* ``overlap`` (default): o_m = ||V_s V_s^T dW||_F / ||dW||_F, the share of the module's
  update that lies in the safety-feature directions (what SaLoRA-style projection would
  remove from it), computed exactly from r x r traces with G = A A^T; or
* ``cosine``: Safe LoRA's selection (lowest cos(C dW, dW) first), to test "Safe LoRA picks
  the modules, the safety features pick the directions".

Unselected modules keep their bytes. Knobs: ``rank`` (top-r_s stored directions),
``select`` (topk | threshold | all), ``topk``, ``threshold`` (on o_m: select o_m >= t;
with ``score: cosine``: cos <= t). Config::

    policy: {kind: salora-select, rank: 8, select: topk, topk: 8, score: overlap}

Data-dependent like SaLoRA-style (V_s comes from a prompt set); measure it, do not assume.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..adapters import LoraAdapter
from ..bank import AlignmentBank
from ..projection import ProjectionKind
from .base import PolicyConfig, PolicyResult, analyze_adapter, module_report, pdst_term_for
from .salora import LABEL as SALORA_LABEL
from .salora import SaLoRAPolicy, safety_overlap, salora_project

LABEL = "selective SaLoRA-style (post-hoc)"


class SaLoRASelectConfig(PolicyConfig):
    """SaLoRA-style projection on the modules with the highest safety-feature overlap (or lowest cosine)."""

    kind: Literal["salora-select"] = "salora-select"
    rank: int | None = Field(None, ge=1, description="top-k stored safety directions per module (default: all)")
    select: Literal["topk", "threshold", "all"] = "topk"
    topk: int | None = Field(None, ge=0, description="project the k highest-scoring modules")
    threshold: float | None = Field(None, description="overlap >= threshold (score: cosine: cos <= threshold)")
    score: Literal["overlap", "cosine"] = "overlap"

    @model_validator(mode="after")
    def _knob_present(self) -> SaLoRASelectConfig:
        if self.select == "topk" and self.topk is None:
            raise ValueError("select: topk needs topk")
        if self.select == "threshold" and self.threshold is None:
            raise ValueError("select: threshold needs threshold")
        return self

    def uses_safety_features(self) -> bool:
        return True


def choose(scores: dict[str, float], config: SaLoRASelectConfig) -> set[str]:
    """Modules to project; ``scores`` are "higher = more suspect" (cosines are negated by the caller)."""
    if config.select == "all":
        return set(scores)
    if config.select == "threshold":
        return {n for n, s in scores.items() if s >= config.threshold}
    ranked = sorted(scores, key=lambda n: (-scores[n], n))  # name breaks ties: deterministic
    return set(ranked[: config.topk])


class SaLoRASelectPolicy(SaLoRAPolicy):
    """Same features and bank check as SaLoRA-style; ``apply`` adds the module choice."""

    name = "salora-select"

    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult:
        features = bank.require_safety_features(f"the {LABEL} policy")
        k = self.config.rank
        Vs = {
            n: (features[n].to(torch.float32)[:, :k] if k else features[n].to(torch.float32)) for n in adapter.modules
        }
        analyses = analyze_adapter(adapter, bank, ProjectionKind.APPROX)
        overlaps = {n: safety_overlap(Vs[n], m) for n, m in adapter.modules.items()}
        if self.config.score == "overlap":
            chosen = choose(overlaps, self.config)
        else:
            # Safe LoRA's order: lowest rounded cosine first; threshold means cos <= t.
            neg = {n: -a.score.cosine_rounded for n, a in analyses.items()}
            cfg = self.config
            chosen = choose(
                neg, cfg.model_copy(update={"threshold": -cfg.threshold}) if cfg.select == "threshold" else cfg
            )
        tensors = dict(adapter.tensors)
        reports = []
        for name, module in adapter.modules.items():
            final_B = module.lora_B
            if name in chosen:
                final_B = salora_project(Vs[name], module.lora_B).to(device="cpu", dtype=module.lora_B.dtype)
                tensors[module.b_key] = final_B
            reports.append(
                module_report(
                    bank,
                    module,
                    analyses[name],
                    projected=name in chosen,
                    pdst_term=pdst_term_for(analyses[name], module.lora_B, final_B),
                    salora_removed_fraction=overlaps[name],
                )
            )
        picked = sorted(overlaps[n] for n in chosen)
        notes = [
            f"{LABEL}: {SALORA_LABEL} projection with {'top ' + str(k) if k else 'all stored'} safety directions on "
            f"{len(chosen)}/{len(reports)} module(s) chosen by {self.config.score} ({self.config.select}); "
            f"their overlap {picked[0]:.3f}-{picked[-1]:.3f}"
            if picked
            else f"{LABEL}: no module selected"
        ]
        return PolicyResult(tensors=tensors, modules=reports, changed=bool(chosen), notes=notes)
