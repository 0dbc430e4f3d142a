"""The report written beside every projected adapter (``safelora_report.json``).

It is the audit record: what was measured per module, what was changed, with
which policy and bank, and the content hashes that tie input to output.

Every policy reports the Safe LoRA diagnostics of each module of the *uploaded*
adapter (cosine, relative distance, update norm), whatever it then does, so
reports from different policies stay comparable. Fields added for the other
policies (pruning, SaLoRA-style projection, chains) are optional with defaults:
reports written before them still parse.

``summary.outcome``: "modified" means the policy changed the adapter in any way
(a projected lora_B, a pruned module, ...): the served bytes differ from the
upload. "unchanged" means they are the upload byte for byte. "refused" means it
was refused (``summary.refusal`` says why). Reports written before these names
said "projected" and "rejected" (and ``rejection``); they still parse, as the new names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator

REPORT_FILE = "safelora_report.json"
REPORT_FORMAT_VERSION = 1
# The words reports used before "modified" and "refused" (read as the new ones).
_OLD_OUTCOMES = {"projected": "modified", "rejected": "refused"}


class ModuleReport(BaseModel):
    module: str
    cosine: float = Field(description="cos(vec(C dW), vec(dW)), rounded to 5 decimals like the reference")
    cosine_raw: float = Field(description="the same, unrounded")
    projected: bool
    pdst_term: float = Field(description="1 / (1 + ||lora_B_final - C lora_B||_F), the reference's Pdst term")
    relative_distance: float = Field(description="||(C - I) dW||_F / ||dW||_F")
    update_norm: float = Field(description="||dW||_F = ||s B A||_F")
    rank: int
    scale: float
    shape: tuple[int, int] = Field(description="(d_out, d_in)")
    bank_error_bound: float = Field(description="||C - C_k||_2 from the bank's truncation of this module")
    # Optional, filled by policies other than Safe LoRA (defaults keep older reports valid).
    pruned: bool = Field(False, description="the module's lora_A/lora_B were removed from the served adapter")
    distance_score: float | None = Field(
        None, description="SPLoRA score: relative_distance standardised over the adapter's modules, (d - median) / IQR"
    )
    salora_removed_fraction: float | None = Field(
        None, description="SaLoRA-style: ||V_s V_s^T dW||_F / ||dW||_F, the share of the update removed"
    )
    actions: list[str] = Field(
        default_factory=list,
        description="what each policy step did to this module, e.g. ['safelora:project', 'splora:prune']",
    )


class ReportSummary(BaseModel):
    outcome: Literal["modified", "unchanged", "refused"] = Field(
        description="modified: the policy changed the adapter (any module projected or pruned); "
        "unchanged: served byte for byte as uploaded; refused: not served (see refusal)"
    )
    modules: int
    projected: int = Field(description="modules whose lora_B was replaced by a projection (Safe LoRA or SaLoRA-style)")
    mean_pdst: float
    min_cosine: float | None
    mean_cosine: float | None
    policy_name: str
    policy: dict[str, Any]
    policy_id: str
    bank_id: str
    input_hash: str
    output_hash: str | None
    seconds: float
    max_bank_error_bound: float = Field(description="largest truncation error bound among the adapter's modules")
    refusal: str | None = Field(
        None, validation_alias=AliasChoices("refusal", "rejection"), description="why it was refused, if it was"
    )
    # Optional (defaults keep older reports valid).
    pruned: int = Field(0, description="modules removed from the adapter (SPLoRA)")
    lora_flops_per_token: int | None = Field(
        None, description="LoRA FLOPs per token of the uploaded adapter: sum over modules of 2 r (d_in + d_out)"
    )
    lora_flops_per_token_after: int | None = Field(None, description="the same for the served adapter")
    lora_flops_saved_fraction: float = Field(0.0, description="1 - after / before")
    features_id: str | None = Field(
        None, description="identity of the bank's safety features (V_s) when the policy used them"
    )
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="shadow: the original adapter was served; this report says what would have been done"
    )
    tenant_rule: str | None = Field(None, description="the tenant rule (name pattern) that chose the policy")

    @field_validator("outcome", mode="before")
    @classmethod
    def _outcome_in_current_words(cls, value: Any) -> Any:
        return _OLD_OUTCOMES.get(value, value)

    @property
    def rejection(self) -> str | None:
        """Deprecated name of :attr:`refusal` (kept for one release)."""
        return self.refusal


class AdapterReport(BaseModel):
    format_version: int = REPORT_FORMAT_VERSION
    adapter: str
    summary: ReportSummary
    modules: list[ModuleReport]
    notes: list[str] = Field(default_factory=list)

    def table(self) -> str:
        """A readable per-module table for the terminal."""
        width = max([len("module")] + [len(m.module) for m in self.modules])
        with_z = any(m.distance_score is not None for m in self.modules)
        with_sf = any(m.salora_removed_fraction is not None for m in self.modules)
        head = f"{'module':<{width}}  {'cosine':>9}  {'rel.dist':>8}"
        head += f"  {'z':>7}" if with_z else ""
        head += f"  {'sf.rm':>6}" if with_sf else ""
        lines = [head + f"  {'pdst':>6}  action"]
        for m in self.modules:
            if m.actions:
                action = "+".join(a.split(":", 1)[-1].upper() for a in m.actions)
            else:
                action = "PRUNE" if m.pruned else ("PROJECT" if m.projected else "keep")
            row = f"{m.module:<{width}}  {m.cosine:>9.5f}  {m.relative_distance:>8.4f}"
            if with_z:
                row += f"  {m.distance_score:>7.3f}" if m.distance_score is not None else f"  {'-':>7}"
            if with_sf:
                row += (
                    f"  {m.salora_removed_fraction:>6.3f}" if m.salora_removed_fraction is not None else f"  {'-':>6}"
                )
            lines.append(row + f"  {m.pdst_term:>6.3f}  {action}")
        s = self.summary
        pruned = f", {s.pruned} pruned" if s.pruned else ""
        lines.append(
            f"{s.projected}/{s.modules} modules projected{pruned}; mean Pdst {s.mean_pdst:.4f}; "
            f"policy {s.policy_name} {s.policy}; bank {s.bank_id}"
            + (f" (safety features {s.features_id})" if s.features_id else "")
        )
        if s.pruned and s.lora_flops_per_token:
            lines.append(
                f"LoRA compute per token: {s.lora_flops_per_token_after:,} of {s.lora_flops_per_token:,} FLOPs "
                f"({s.lora_flops_saved_fraction:.1%} saved)"
            )
        if s.max_bank_error_bound > 1e-9:  # below that it is float32 round-off, not truncation
            lines.append(
                f"bank truncation error bound (max over modules): ||C - C_k||_2 <= {s.max_bank_error_bound:.3e}"
            )
        return "\n".join(lines)
