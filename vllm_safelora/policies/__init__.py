"""Adapter safety policies: one file per policy behind :class:`Policy`.

* ``safelora``: Safe LoRA projection lora_B := C lora_B of low-cosine modules (arXiv 2405.16833).
* ``splora``: distance-guided pruning, SPLoRA-style with an explicit robust score (arXiv 2506.18931).
* ``salora-style``: SaLoRA-style (post-hoc) safety-feature projection lora_B := (I - V_s V_s^T) lora_B (arXiv 2501.01765).
* ``salora-select``: SaLoRA-style projection on the modules with the highest safety-feature overlap only.
* ``chain``: several of the above in order.
"""

from __future__ import annotations

from typing import Annotated, Any
from collections.abc import Mapping

from pydantic import BeforeValidator, TypeAdapter

from .base import Policy, PolicyConfig, PolicyResult, adapter_view
from .chain import ChainConfig, ChainPolicy
from .registry import make_policy, policy_config_union, register_policy
from .salora import SaLoRAConfig, SaLoRAPolicy
from .salora_select import SaLoRASelectConfig, SaLoRASelectPolicy
from .safelora import SafeLoRAConfig, SafeLoRAPolicy
from .splora import SPLoRAConfig, SPLoRAPolicy

# The policies, in this order (pydantic's union, its schema and its error messages follow it).
# A new policy: its own file, and one line here.
register_policy("safelora", SafeLoRAConfig, SafeLoRAPolicy)
register_policy("splora", SPLoRAConfig, SPLoRAPolicy)
register_policy("salora-style", SaLoRAConfig, SaLoRAPolicy)
register_policy("salora-select", SaLoRASelectConfig, SaLoRASelectPolicy)
register_policy("chain", ChainConfig, ChainPolicy, step=False)

# Discriminated on ``kind``: configs name the policy they want.
AnyPolicyConfig = policy_config_union()


def with_default_kind(value: Any) -> Any:
    """Pydantic BeforeValidator: a policy mapping without ``kind`` is Safe LoRA (configs predating other kinds).

    Use as ``policy: Annotated[AnyPolicyConfig, BeforeValidator(with_default_kind)]``.
    """
    if isinstance(value, Mapping) and "kind" not in value:
        return {**value, "kind": "safelora"}
    return value


PolicySetting = Annotated[AnyPolicyConfig, BeforeValidator(with_default_kind)]
"""Any policy, ``kind`` defaulting to safelora: the type for a settings field."""

_ANY = TypeAdapter(PolicySetting)


def parse_policy(data: Mapping[str, Any]) -> PolicyConfig:
    """A policy config from a mapping (YAML/JSON); ``kind`` defaults to safelora. Raises pydantic ValidationError."""
    return _ANY.validate_python(data)


__all__ = [
    "AnyPolicyConfig",
    "ChainConfig",
    "ChainPolicy",
    "Policy",
    "PolicyConfig",
    "PolicyResult",
    "PolicySetting",
    "SPLoRAConfig",
    "SPLoRAPolicy",
    "SaLoRAConfig",
    "SaLoRAPolicy",
    "SaLoRASelectConfig",
    "SaLoRASelectPolicy",
    "SafeLoRAConfig",
    "SafeLoRAPolicy",
    "adapter_view",
    "make_policy",
    "parse_policy",
    "register_policy",
    "with_default_kind",
]
