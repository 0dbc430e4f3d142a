"""Composition: policies applied in order, each seeing the previous step's result.

    policy:
      kind: chain
      steps:
        - {kind: safelora, select: threshold, threshold: 0.35}
        - {kind: splora, select: threshold, threshold: 1.5}

Step i+1 receives :func:`adapter_view` of the original adapter with step i's
tensors: projected lora_B replace the originals (already cast back to the
adapter's dtype, exactly as if the step's output had been written and read
back), and modules pruned by an earlier step are gone, so later steps neither
score nor touch them (SPLoRA's standardisation then runs over the remaining
modules). Applying a chain therefore equals applying its steps one after the
other by hand, and order matters: Safe LoRA then pruning scores distances of
the projected updates; pruning then Safe LoRA projects only what survived.

The merged report has one row per module of the uploaded adapter:

* cosine, cosine_raw, relative_distance, update_norm: the first step's
  measurement of the upload (what admission rules should judge);
* projected / pruned: whether any step projected / pruned the module;
  ``actions`` lists them in order, e.g. ["safelora:project", "splora:prune"];
* distance_score, salora_removed_fraction: from the (last) step that reports them;
* pdst_term: 1 / (1 + ||lora_B_served - C lora_B_uploaded||_F), with the first
  Safe LoRA step's projection kind (approx if none), 0 as served lora_B when pruned.

Notes carry each step's notes, prefixed with the step. Chains do not nest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..adapters import LoraAdapter
from ..bank import AlignmentBank
from ..projection import ProjectionKind
from ..report import ModuleReport
from .base import Policy, PolicyConfig, PolicyResult, adapter_view, analyze_adapter, pdst_term_for
from .registry import make_policy
from .safelora import SafeLoRAConfig

if TYPE_CHECKING:
    # At run time StepConfig is the union of the registered step policies' configs,
    # resolved by registry.policy_config_union() once every policy is registered.
    StepConfig = PolicyConfig


class ChainConfig(PolicyConfig):
    kind: Literal["chain"] = "chain"
    steps: tuple[StepConfig, ...] = Field(min_length=1, description="policies applied in order")

    def uses_safety_features(self) -> bool:
        return any(step.uses_safety_features() for step in self.steps)


class ChainPolicy(Policy):
    name = "chain"

    def __init__(self, config: ChainConfig):
        self.config = config
        self.steps = [make_policy(step) for step in config.steps]

    def validate_bank(self, bank: AlignmentBank) -> None:
        for step in self.steps:
            step.validate_bank(bank)

    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult:
        n = len(self.steps)
        current = adapter
        results: list[PolicyResult] = []
        notes: list[str] = []
        for i, (cfg, step) in enumerate(zip(self.config.steps, self.steps)):
            res = step.apply(current, bank)
            results.append(res)
            projected = sum(r.projected for r in res.modules)
            pruned = sum(r.pruned for r in res.modules)
            notes.append(
                f"step {i + 1}/{n} ({cfg.kind}): {len(res.modules)} module(s) in, {projected} projected, "
                f"{pruned} pruned{'' if res.changed else ', no change'}"
            )
            notes.extend(f"step {i + 1} ({cfg.kind}): {note}" for note in res.notes)
            current = adapter_view(adapter, res.tensors)

        kind = next((c.projection for c in self.config.steps if isinstance(c, SafeLoRAConfig)), ProjectionKind.APPROX)
        final = results[-1].tensors
        # Pdst is measured against the upload (the reference's C lora_B_in), whatever the steps did.
        analyses = analyze_adapter(adapter, bank, kind)
        per_step = [{r.module: r for r in res.modules} for res in results]
        merged: list[ModuleReport] = []
        for name, module in adapter.modules.items():
            rows = [(cfg.kind, rows[name]) for cfg, rows in zip(self.config.steps, per_step) if name in rows]
            first = rows[0][1]
            actions = [f"{k}:prune" if r.pruned else f"{k}:project" for k, r in rows if r.pruned or r.projected]
            pruned = any(r.pruned for _, r in rows)
            z = [r.distance_score for _, r in rows if r.distance_score is not None]
            sf = [r.salora_removed_fraction for _, r in rows if r.salora_removed_fraction is not None]
            served_B = None if pruned else final[module.b_key]
            merged.append(
                first.model_copy(
                    update={
                        "projected": any(r.projected for _, r in rows),
                        "pruned": pruned,
                        "pdst_term": pdst_term_for(analyses[name], module.lora_B, served_B),
                        "distance_score": z[-1] if z else None,
                        "salora_removed_fraction": sf[-1] if sf else None,
                        "actions": actions,
                    }
                )
            )
        return PolicyResult(
            tensors=dict(final),
            modules=merged,
            changed=any(res.changed for res in results),
            notes=notes,
            pruned=tuple(name for name in adapter.modules if name not in current.modules),
        )
