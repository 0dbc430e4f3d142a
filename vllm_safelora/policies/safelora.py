"""Safe LoRA (Hsu et al., NeurIPS 2024): project selected modules' lora_B onto C lora_B."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..adapters import LoraAdapter
from ..bank import AlignmentBank
from ..projection import ProjectionKind, SelectMode, pdst_term, select_modules
from ..report import ModuleReport
from .base import Policy, PolicyConfig, PolicyResult, analyze_adapter, module_report


class SafeLoRAConfig(PolicyConfig):
    kind: Literal["safelora"] = "safelora"
    select: SelectMode = Field(SelectMode.THRESHOLD, description="threshold | topk | all")
    threshold: float = Field(0.35, ge=-1.0, le=1.0, description="project modules with cosine <= threshold")
    topk: int = Field(10, ge=0, description="project the k modules with the lowest cosine (ties add modules)")
    projection: ProjectionKind = Field(ProjectionKind.APPROX, description="approx (paper default) | exact")


class SafeLoRAPolicy(Policy):
    name = "safelora"

    def __init__(self, config: SafeLoRAConfig):
        self.config = config

    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult:
        cfg = self.config
        analyses = analyze_adapter(adapter, bank, cfg.projection)
        # A module whose base and aligned weights are identical has no alignment
        # subspace (the reference's C is 0/0 = NaN and never selected): keep the
        # tenant's update there rather than zero it.
        empty = {name for name in analyses if bank.get(name).frobenius_norm == 0.0}
        rounded = {name: a.score.cosine_rounded for name, a in analyses.items() if name not in empty}
        selected = select_modules(rounded, cfg.select, threshold=cfg.threshold, topk=cfg.topk)

        tensors = dict(adapter.tensors)
        reports: list[ModuleReport] = []
        for name, module in adapter.modules.items():
            a = analyses[name]
            projected = name in selected
            if projected:
                tensors[module.b_key] = a.projected_B.to(device="cpu", dtype=module.lora_B.dtype)
            reports.append(module_report(bank, module, a, projected=projected, pdst_term=pdst_term(a.score, projected)))
        notes = []
        if empty:
            notes.append(
                f"{len(empty)} module(s) have an empty alignment subspace (base == aligned), left unprojected: "
                + ", ".join(sorted(empty)[:5])
            )
        if cfg.projection is ProjectionKind.EXACT:
            full = [
                r.module
                for r in reports
                if (m := bank.manifest.module(r.module)) is not None
                and min(m.rank_kept, m.numerical_rank) >= m.shape[0]
            ]
            if full:
                notes.append(
                    f"exact projection onto a subspace spanning all d_out output directions is the identity "
                    f"for {len(full)} module(s) "
                    "(e.g. " + full[0] + "); build the bank with --rank or --energy for exact mode to change anything"
                )
        return PolicyResult(tensors=tensors, modules=reports, changed=bool(selected), notes=notes)
