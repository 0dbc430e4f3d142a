"""The offline engine: check an adapter against a bank, apply a policy, produce bytes and a report.

``project_adapter`` is what the CLI and the server's service both call. It
never writes; ``write_projected`` does, atomically.

Any policy kind works here (Safe LoRA, SPLoRA pruning, SaLoRA-style, chains).
When a policy pruned modules, their tensors are absent from the output and
adapter_config.json lists them in ``exclude_modules`` (otherwise the config is
kept byte for byte). The report's ``policy_id`` is ``policy.policy_id(bank)``:
it includes the bank's safety-features id for policies that use V_s, and
equals ``policy.policy_id()`` for the others. Cache keys must use the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable

from .adapters import (
    LoraAdapter,
    SerializedAdapter,
    changed_update_problems,
    config_excluding_modules,
    serialize_adapter,
    unchanged_files,
    write_adapter_dir,
)
from .bank import AlignmentBank
from .errors import AdapterRefused, Problems, RefusalReason
from .policies import PolicyConfig, make_policy
from .policies.base import lora_flops_per_token
from .projection import mean_pdst
from .report import REPORT_FILE, AdapterReport, ReportSummary
from .policies.tenant_rules import TenantPolicy


@dataclass(frozen=True)
class ProjectionOutcome:
    adapter: SerializedAdapter
    """The patched adapter's files, report included (``safelora_report.json``)."""
    report: AdapterReport


def check_compatible(
    adapter: LoraAdapter,
    bank: AlignmentBank,
    *,
    aliases: Iterable[str] = (),
    require_base_model_match: bool = True,
    name: str | None = None,
) -> None:
    """Refuse an adapter the bank cannot protect: other base model, unknown modules, wrong shapes."""
    who = name or str(adapter.path)
    manifest = bank.manifest
    base = adapter.base_model
    if require_base_model_match:
        if base is None:
            raise AdapterRefused(
                RefusalReason.BASE_MODEL_MISMATCH,
                "adapter_config.json has no base_model_name_or_path; the server cannot tell which model it was trained for",
                who,
            )
        if not manifest.protects(base, aliases):
            known = [manifest.aligned.ref, *manifest.aliases, *aliases]
            raise AdapterRefused(
                RefusalReason.BASE_MODEL_MISMATCH,
                f"it was trained for '{base}', but this server's bank protects {known}. "
                "If that is the same model under another name, add it to the bank's aliases",
                who,
            )
    problems = Problems(who, shown=10)
    for module_name, module in adapter.modules.items():
        meta = manifest.module(module_name)
        if meta is None or bank.get(module_name) is None:
            problems.add(
                RefusalReason.UNKNOWN_MODULE, f"module {module_name} is not in the alignment bank {manifest.bank_id}"
            )
            continue
        if (module.d_out, module.d_in) != tuple(meta.shape):
            problems.add(
                RefusalReason.SHAPE_MISMATCH,
                f"module {module_name}: the update is {module.d_out} x {module.d_in}, the model's weight is "
                f"{meta.shape[0]} x {meta.shape[1]}",
            )
    problems.raise_if_any()


def project_adapter(
    adapter: LoraAdapter,
    bank: AlignmentBank,
    policy: PolicyConfig,
    *,
    name: str | None = None,
    aliases: Iterable[str] = (),
    require_base_model_match: bool = True,
) -> ProjectionOutcome:
    """Check, apply the policy and serialise; raises AdapterRefused, writes nothing."""
    served, report = _apply_policy(
        adapter,
        bank,
        policy,
        who=name or str(adapter.path),
        aliases=aliases,
        require_base_model_match=require_base_model_match,
    )
    return ProjectionOutcome(adapter=with_report(served, report), report=report)


def _apply_policy(
    adapter: LoraAdapter,
    bank: AlignmentBank,
    policy: PolicyConfig,
    *,
    who: str,
    aliases: Iterable[str],
    require_base_model_match: bool,
) -> tuple[SerializedAdapter, AdapterReport]:
    """The policy's output files (without the report) and the report, for any caller."""
    start = time.perf_counter()
    check_compatible(adapter, bank, aliases=aliases, require_base_model_match=require_base_model_match, name=who)
    result = make_policy(policy).apply(adapter, bank)
    overflow = changed_update_problems(adapter, result.tensors)
    if overflow:
        raise AdapterRefused(RefusalReason.UPDATE_OVERFLOW, "; ".join(overflow), who)
    if result.changed:
        config_bytes = config_excluding_modules(adapter.config_bytes, list(result.pruned))
        serialized = serialize_adapter(config_bytes, result.tensors, adapter.metadata)
    else:
        # Unchanged adapters are served byte-for-byte as uploaded (re-written only to canonical tensor names).
        serialized = unchanged_files(adapter)
    cosines = [m.cosine for m in result.modules]
    bounds = [m.bank_error_bound for m in result.modules]
    flops_before = lora_flops_per_token(adapter)
    pruned = set(result.pruned)
    flops_after = lora_flops_per_token(adapter, without=pruned)
    summary = ReportSummary(
        outcome="modified" if result.changed else "unchanged",
        modules=len(result.modules),
        projected=sum(m.projected for m in result.modules),
        mean_pdst=mean_pdst([m.pdst_term for m in result.modules]),
        min_cosine=min(cosines) if cosines else None,
        mean_cosine=sum(cosines) / len(cosines) if cosines else None,
        policy_name=policy.kind,
        policy=policy.model_dump(mode="json"),
        policy_id=policy.policy_id(bank),
        bank_id=bank.bank_id,
        input_hash=adapter.content_hash,
        output_hash=serialized.content_hash,
        seconds=time.perf_counter() - start,
        max_bank_error_bound=max(bounds) if bounds else 0.0,
        pruned=sum(m.pruned for m in result.modules),
        lora_flops_per_token=flops_before,
        lora_flops_per_token_after=flops_after,
        lora_flops_saved_fraction=1.0 - flops_after / flops_before if flops_before else 0.0,
        features_id=bank.features_id if policy.uses_safety_features() else None,
    )
    return serialized, AdapterReport(adapter=who, summary=summary, modules=result.modules, notes=result.notes)


def project_for_tenant(
    adapter: LoraAdapter,
    bank: AlignmentBank,
    tenant: TenantPolicy,
    *,
    name: str | None = None,
    aliases: Iterable[str] = (),
    require_base_model_match: bool = True,
) -> ProjectionOutcome:
    """What a server serves for one tenant: the policy's outcome with its final report.

    Raises AdapterRefused(ADMISSION) when the tenant's admission rules refuse it (in
    shadow mode the refusal is only reported). A shadow outcome holds the upload's own
    tensors; its report says what the policy would have done.
    """
    who = name or str(adapter.path)
    served, report = _apply_policy(
        adapter, bank, tenant.policy, who=who, aliases=aliases, require_base_model_match=require_base_model_match
    )
    problem = tenant.admission_problem(report)
    if problem is not None and not tenant.shadow:
        raise AdapterRefused(RefusalReason.ADMISSION, problem, who)
    summary = report.summary.model_copy(
        update={
            "mode": "shadow" if tenant.shadow else "enforce",
            "tenant_rule": tenant.rule,
            "policy_id": tenant.cache_policy_id(bank),
            "refusal": problem,
            "outcome": "refused" if problem else report.summary.outcome,
        }
    )
    notes = report.notes
    if tenant.shadow:
        would_be = report.summary.output_hash
        served = unchanged_files(adapter)
        summary = summary.model_copy(update={"output_hash": served.content_hash})
        notes = [*notes, f"SHADOW MODE: served unchanged; the policy would have produced {would_be}"]
    report = report.model_copy(update={"summary": summary, "notes": notes})
    return ProjectionOutcome(adapter=with_report(served, report), report=report)


def with_report(adapter: SerializedAdapter, report: AdapterReport) -> SerializedAdapter:
    """The adapter's files with ``safelora_report.json`` (re)placed beside them."""
    files = dict(adapter.extra_files)
    files[REPORT_FILE] = (report.model_dump_json(indent=2) + "\n").encode()
    return SerializedAdapter(adapter.config_bytes, adapter.weights_bytes, files)


def write_projected(outcome: ProjectionOutcome, out_dir: Path, *, overwrite: bool = False) -> Path:
    return write_adapter_dir(out_dir, outcome.adapter, overwrite=overwrite)
