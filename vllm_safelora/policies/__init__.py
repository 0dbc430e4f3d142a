"""Adapter safety policies: one file per policy behind :class:`Policy`.

* ``safelora``: Safe LoRA projection lora_B := C lora_B of low-cosine modules (arXiv 2405.16833).
* ``splora``: distance-guided pruning, SPLoRA-style with an explicit robust score (arXiv 2506.18931).
* ``salora-style``: SaLoRA-style (post-hoc) safety-feature projection lora_B := (I - V_s V_s^T) lora_B (arXiv 2501.01765).
* ``salora-select``: SaLoRA-style projection on the modules with the highest safety-feature overlap only.
* ``chain``: several of the above in order.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Union

from pydantic import BeforeValidator, Field, TypeAdapter

from .base import Policy, PolicyConfig, PolicyResult, adapter_view
from .chain import ChainConfig, ChainPolicy, make_step
from .salora import SaLoRAConfig, SaLoRAPolicy
from .salora_select import SaLoRASelectConfig, SaLoRASelectPolicy
from .safelora import SafeLoRAConfig, SafeLoRAPolicy
from .splora import SPLoRAConfig, SPLoRAPolicy

# Discriminated on ``kind``: configs name the policy they want.
AnyPolicyConfig = Annotated[
    Union[SafeLoRAConfig, SPLoRAConfig, SaLoRAConfig, SaLoRASelectConfig, ChainConfig], Field(discriminator="kind")
]

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


def make_policy(config: PolicyConfig) -> Policy:
    if isinstance(config, ChainConfig):
        return ChainPolicy(config)
    return make_step(config)


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
    "with_default_kind",
]
