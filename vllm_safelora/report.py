"""The report written beside every projected adapter (``safelora_report.json``).

It is the audit record: what was measured per module, what was changed, with
which policy and bank, and the content hashes that tie input to output.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

REPORT_FILE = "safelora_report.json"
REPORT_FORMAT_VERSION = 1


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


class ReportSummary(BaseModel):
    outcome: Literal["projected", "unchanged", "rejected"]
    modules: int
    projected: int
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
    rejection: str | None = None
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="shadow: the original adapter was served; this report says what would have been done"
    )
    tenant_rule: str | None = Field(None, description="the tenant rule (name pattern) that chose the policy")


class AdapterReport(BaseModel):
    format_version: int = REPORT_FORMAT_VERSION
    adapter: str
    summary: ReportSummary
    modules: list[ModuleReport]
    notes: list[str] = Field(default_factory=list)

    def table(self) -> str:
        """A readable per-module table for the terminal."""
        width = max([len("module")] + [len(m.module) for m in self.modules])
        lines = [f"{'module':<{width}}  {'cosine':>9}  {'rel.dist':>8}  {'pdst':>6}  action"]
        for m in self.modules:
            action = "PROJECT" if m.projected else "keep"
            lines.append(
                f"{m.module:<{width}}  {m.cosine:>9.5f}  {m.relative_distance:>8.4f}  {m.pdst_term:>6.3f}  {action}"
            )
        s = self.summary
        lines.append(
            f"{s.projected}/{s.modules} modules projected; mean Pdst {s.mean_pdst:.4f}; "
            f"policy {s.policy_name} {s.policy}; bank {s.bank_id}"
        )
        if s.max_bank_error_bound > 1e-9:  # below that it is float32 round-off, not truncation
            lines.append(f"bank truncation error bound (max over modules): ||C - C_k||_2 <= {s.max_bank_error_bound:.3e}")
        return "\n".join(lines)
