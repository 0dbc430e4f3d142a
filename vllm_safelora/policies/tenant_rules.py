"""Per-tenant policy: adapter-name patterns -> policy, admission rules, shadow mode.

The tenant and admission models live here (the configuration,
:mod:`vllm_safelora.config`, uses them; this module does not import it).

Rules are tried in order and the first whose pattern matches the adapter's
location wins (its real path under an adapter root, or ``hub:org/repo``: never a
name an API client chose); adapters no rule matches get the top-level ``policy``
and ``admission``. Patterns are case-sensitive shell globs on the whole location
(``trusted/*`` matches ``trusted/x`` but not ``trusted-x/y``); local locations
are plain ASCII with at most one ``/``, so one cannot pose as another tenant's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from . import PolicyConfig, PolicySetting


class AdmissionConfig(BaseModel):
    """Refuse an adapter outright instead of (only) projecting it."""

    model_config = ConfigDict(extra="forbid")

    max_projected_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="refuse when more than this fraction of modules needed projection"
    )
    min_cosine: float | None = Field(
        None, ge=-1.0, le=1.0, description="refuse when any module's cosine is below this floor"
    )
    max_mean_cosine: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="refuse when the adapter's mean module cosine is at or above this (detection, data-free). In the "
        "safety miniature, jailbreak fine-tunes undo the alignment (dW ~ -V) and score HIGH cosines: 0.526 caught "
        "90% of held-out harmful adapters with no false refusal among 11 harmless ones (benchmarks/results/safety/"
        "selection). Toy-scale evidence with a post-hoc orientation: calibrate on your own adapters before enabling",
    )


class TenantRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(description="glob on the adapter's location (path under an adapter root, or hub:org/repo)")
    shadow: bool | None = Field(None, description="report-only for these adapters (None: the global setting)")
    policy: PolicySetting | None = Field(None, description="policy for these adapters (None: the top-level policy)")
    admission: AdmissionConfig | None = Field(None, description="admission rules (None: the top-level ones)")


class TenantSettings(Protocol):
    """The part of the configuration (:class:`vllm_safelora.config.SafeLoRASettings`) tenancy reads."""

    @property
    def tenants(self) -> Sequence[TenantRule]: ...
    @property
    def policy(self) -> PolicyConfig: ...
    @property
    def admission(self) -> AdmissionConfig: ...
    @property
    def shadow(self) -> bool: ...


@dataclass(frozen=True)
class TenantPolicy:
    """What applies to one adapter name."""

    rule: str
    """The matching pattern, or 'default'."""
    policy: PolicyConfig
    admission: AdmissionConfig
    shadow: bool
    """Report-only: serve the original adapter, record what the policy would have done."""

    def cache_policy_id(self, bank=None) -> str:
        """What, besides the upload and the bank, decides a served entry's bytes and report.

        A shadow entry holds the original weights; it must never be mistaken for the
        enforcing entry of the same policy. The bank folds in data the bank_id does not
        cover (SaLoRA-style safety features). Admission rules are part of it, so an entry
        exists only for adapters its rules admitted and a cache hit needs no second check.
        """
        rules = self.admission.model_dump(exclude_none=True)
        admitted = (
            "-admit-" + hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:12] if rules else ""
        )
        return self.policy.policy_id(bank) + admitted + ("-shadow" if self.shadow else "")

    def admission_problem(self, report) -> str | None:
        """Why this tenant's admission rules refuse an adapter with this report, or None."""
        s, admission = report.summary, self.admission
        if admission.max_projected_fraction is not None and s.modules:
            fraction = s.projected / s.modules
            if fraction > admission.max_projected_fraction:
                return (
                    f"{s.projected} of {s.modules} modules ({fraction:.0%}) needed projection, more than the "
                    f"allowed {admission.max_projected_fraction:.0%}"
                )
        if admission.min_cosine is not None and s.min_cosine is not None and s.min_cosine < admission.min_cosine:
            worst = min(report.modules, key=lambda m: m.cosine)
            return f"module {worst.module} has cosine {worst.cosine:.5f}, below the floor {admission.min_cosine}"
        if (
            admission.max_mean_cosine is not None
            and s.mean_cosine is not None
            and s.mean_cosine >= admission.max_mean_cosine
        ):
            return (
                f"the mean module cosine {s.mean_cosine:.5f} is at or above {admission.max_mean_cosine}: the update "
                "lies along the alignment subspace, as fine-tunes that undo the alignment do"
            )
        return None


def _rule_applies(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern)


def resolve_tenant(settings: TenantSettings, name: str) -> TenantPolicy:
    for rule in settings.tenants:
        if _rule_applies(rule.match, name):
            return TenantPolicy(
                rule=rule.match,
                policy=rule.policy if rule.policy is not None else settings.policy,
                admission=rule.admission if rule.admission is not None else settings.admission,
                shadow=settings.shadow if rule.shadow is None else rule.shadow,
            )
    return TenantPolicy(rule="default", policy=settings.policy, admission=settings.admission, shadow=settings.shadow)


def all_policies(settings: TenantSettings) -> list[PolicyConfig]:
    return [settings.policy, *(r.policy for r in settings.tenants if r.policy is not None)]


def describe_rules(settings: TenantSettings) -> list[dict[str, Any]]:
    rows = [
        {
            "match": r.match,
            "policy": (r.policy or settings.policy).model_dump(mode="json"),
            "shadow": settings.shadow if r.shadow is None else r.shadow,
        }
        for r in settings.tenants
    ]
    rows.append({"match": "default", "policy": settings.policy.model_dump(mode="json"), "shadow": settings.shadow})
    return rows
