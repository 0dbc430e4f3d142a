"""Adapter safety policies: one file per policy behind :class:`Policy`."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import Policy, PolicyConfig, PolicyResult
from .safelora import SafeLoRAConfig, SafeLoRAPolicy

# Discriminated on ``kind``: configs name the policy they want.
AnyPolicyConfig = Annotated[Union[SafeLoRAConfig], Field(discriminator="kind")]


def make_policy(config: PolicyConfig) -> Policy:
    if isinstance(config, SafeLoRAConfig):
        return SafeLoRAPolicy(config)
    raise TypeError(f"no policy implements config kind {config.kind!r}")


__all__ = [
    "AnyPolicyConfig",
    "Policy",
    "PolicyConfig",
    "PolicyResult",
    "SafeLoRAConfig",
    "SafeLoRAPolicy",
    "make_policy",
]
