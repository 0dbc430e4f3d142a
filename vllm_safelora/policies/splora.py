"""Distance-guided pruning in the spirit of SPLoRA (arXiv 2506.18931), with an explicit score.

SPLoRA drops the LoRA modules whose update moves furthest from the alignment
subspace instead of projecting them. Its public code scores modules with an
"E-DIEM" statistic that standardises each module's value over 50 copies of one
and the same sample: the mean equals the value and the standard deviation is 0
(or float noise), so the standardised score is 0/0 or round-off and the
resulting ranking is meaningless. We therefore define the score explicitly:

    d_m = ||(C - I) dW_m||_F / ||dW_m||_F        (scale-free; C of the bank, approx or exact)

the relative distance of module m's update dW_m = s B A from the alignment
subspace, computed exactly on the r x r fast path
(:func:`vllm_safelora.projection.analyze_module`, ``relative_distance``), then
standardised robustly across the adapter's own modules:

    z_m = (d_m - median(d)) / scale,   scale = IQR(d)              (q75 - q25, linear interpolation as numpy)
                                       else 1.349 * std(d)         when IQR = 0 (population std; 1.349 sigma is
                                                                   the IQR of a normal law, so z keeps its scale)
                                       else 1.0                    when all d are equal (every z is then 0)

"= 0" above means <= 1e-12 * max(1, |median|). IQR = 0 happens when the middle
half of the modules tie (few modules, or copies of one update); the median
absolute deviation is no fallback then, since IQR = 0 implies MAD = 0, while the
standard deviation still sees an outlier. Selection:

* ``select: threshold``: prune every module with z_m > threshold (default 1.5,
  Tukey's outer-fence-like cut: unusually far modules only);
* ``select: topk``: prune the k modules with the largest z (ties broken by
  module name, so exactly k; unlike Safe LoRA's reference, ties do not add).

A pruned module's lora_A and lora_B are *removed* from the served adapter, so
vLLM runs no LoRA kernels for it: LoRA FLOPs per token, sum over modules of
2 r (d_in + d_out), fall by that module's share (reported). The engine also adds
the pruned modules to ``exclude_modules`` in adapter_config.json so that PEFT
loads the served adapter with those modules absent rather than freshly
initialised.

Pruning everything is refused by default: with ``allow_empty: false``, when the
selection covers every module the one with the lowest z (closest to the
alignment subspace) is kept and a note says so. ``allow_empty: true`` permits
an adapter with no LoRA modules at all (an explicit no-op).

Scores are relative: an adapter whose every module is equally far from
alignment prunes nothing in threshold mode. Chain SPLoRA after Safe LoRA, or use
admission rules, when an absolute criterion is wanted.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..adapters import LoraAdapter
from ..bank import AlignmentBank
from ..projection import ProjectionKind
from ..report import ModuleReport
from .base import (
    Policy,
    PolicyConfig,
    PolicyResult,
    analyze_adapter,
    lora_flops_per_token,
    module_report,
    pdst_term_for,
)

_ZERO = 1e-12


class SPLoRAConfig(PolicyConfig):
    kind: Literal["splora"] = "splora"
    select: Literal["threshold", "topk"] = Field("threshold", description="threshold | topk")
    threshold: float = Field(1.5, description="prune modules whose standardised distance z > threshold")
    topk: int = Field(1, ge=0, description="with select: topk, prune the k modules with the largest z")
    projection: ProjectionKind = Field(
        ProjectionKind.APPROX, description="which C the distance uses: approx (paper default) | exact"
    )
    allow_empty: bool = Field(False, description="allow pruning every module (else the closest one is kept)")


def robust_scale(values: list[float]) -> tuple[float, float, str]:
    """(median, scale, which) for the z-score: IQR, else 1.349 * std, else 1.0."""
    t = torch.tensor(values, dtype=torch.float64)
    median = float(torch.quantile(t, 0.5))
    tiny = _ZERO * max(1.0, abs(median))
    iqr = float(torch.quantile(t, 0.75) - torch.quantile(t, 0.25))
    if iqr > tiny:
        return median, iqr, "iqr"
    std = float(t.std(correction=0)) if t.numel() > 1 else 0.0
    if 1.349 * std > tiny:
        return median, 1.349 * std, "1.349*std"
    return median, 1.0, "1.0"


def standardised_distances(distances: dict[str, float]) -> tuple[dict[str, float], float, float, str]:
    if not distances:
        return {}, 0.0, 1.0, "1.0"
    median, scale, which = robust_scale(list(distances.values()))
    return {n: (d - median) / scale for n, d in distances.items()}, median, scale, which


def select_prune(
    z: dict[str, float], select: str, *, threshold: float, topk: int, allow_empty: bool
) -> tuple[set[str], str | None]:
    """Modules to prune, and a note when the all-pruned guard kept one."""
    if select == "threshold":
        chosen = {n for n, v in z.items() if v > threshold}
    else:
        ranked = sorted(z, key=lambda n: (-z[n], n))
        chosen = set(ranked[:topk])
    note = None
    if z and chosen == set(z) and not allow_empty:
        keep = min(z, key=lambda n: (z[n], n))
        chosen.discard(keep)
        note = (
            f"the selection covered all {len(z)} modules; kept {keep} (lowest z = {z[keep]:.3f}) because "
            "allow_empty is false"
        )
    return chosen, note


class SPLoRAPolicy(Policy):
    name = "splora"

    def __init__(self, config: SPLoRAConfig):
        self.config = config

    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult:
        cfg = self.config
        analyses = analyze_adapter(adapter, bank, cfg.projection)
        distances = {n: a.score.relative_distance for n, a in analyses.items()}
        z, median, scale, which = standardised_distances(distances)
        pruned, guard_note = select_prune(
            z, cfg.select, threshold=cfg.threshold, topk=cfg.topk, allow_empty=cfg.allow_empty
        )

        tensors = dict(adapter.tensors)
        reports: list[ModuleReport] = []
        for name, module in adapter.modules.items():
            a = analyses[name]
            is_pruned = name in pruned
            if is_pruned:
                del tensors[module.a_key], tensors[module.b_key]
            final_B = None if is_pruned else module.lora_B
            reports.append(
                module_report(
                    bank,
                    module,
                    a,
                    projected=False,
                    pdst_term=pdst_term_for(a, module.lora_B, final_B),
                    pruned=is_pruned,
                    distance_score=z[name],
                )
            )
        flops_before, flops_after = lora_flops_per_token(adapter), lora_flops_per_token(adapter, without=pruned)
        notes = [
            f"SPLoRA distance d = ||(C - I) dW||_F / ||dW||_F standardised as z = (d - {median:.4g}) / {scale:.4g} "
            f"(median, scale = {which}); pruned {len(pruned)}/{len(z)} module(s)"
            + (
                f"; LoRA FLOPs per token {flops_after:,} of {flops_before:,} "
                f"({1 - flops_after / flops_before:.1%} saved)"
                if pruned and flops_before
                else ""
            )
        ]
        if 0 < len(z) < 4:
            notes.append(f"only {len(z)} module(s): median/IQR standardisation says little about so few values")
        if guard_note:
            notes.append(guard_note)
        if any(not math.isfinite(v) for v in z.values()):  # pragma: no cover - distances are finite
            notes.append("non-finite distance scores")
        return PolicyResult(
            tensors=tensors,
            modules=reports,
            changed=bool(pruned),
            notes=notes,
            pruned=tuple(n for n in adapter.modules if n in pruned),
        )
