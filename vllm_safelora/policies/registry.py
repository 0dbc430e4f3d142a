"""The policy registry: ``kind`` -> (config class, policy class), the way PEFT registers tuners.

A policy is one file (a :class:`PolicyConfig` subclass whose ``kind`` field is a
``Literal`` with that kind as its default, and a :class:`Policy` subclass taking
the config) plus one :func:`register_policy` call in ``policies/__init__.py``.
Everything that dispatches on the kind reads this registry:

* :func:`make_policy` builds the policy for a config;
* :func:`policy_config_union` is the pydantic type of "any policy config"
  (discriminated on ``kind``), used by the settings, ``parse_policy`` and the
  chain's steps;
* a config may annotate a field with the name ``StepConfig`` (any registered
  policy that can be a chain step); :func:`policy_config_union` resolves it.

Policies are registered when ``vllm_safelora.policies`` is imported, before the
union is built; registering later does not change a union already built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field

from .base import Policy, PolicyConfig


@dataclass(frozen=True)
class RegisteredPolicy:
    kind: str
    config: type[PolicyConfig]
    policy: type[Policy]
    step: bool
    """Can be a step of a chain (False for the chain itself: chains do not nest)."""


_POLICIES: dict[str, RegisteredPolicy] = {}


def register_policy(kind: str, config: type[PolicyConfig], policy: type[Policy], *, step: bool = True) -> None:
    """Make ``kind`` a policy: configs with this kind parse to ``config`` and run as ``policy(config)``."""
    declared = config.model_fields["kind"].default
    if declared != kind:
        raise ValueError(f"{config.__name__}.kind defaults to {declared!r}, registered as {kind!r}")
    if kind in _POLICIES:
        raise ValueError(f"policy kind {kind!r} is already registered ({_POLICIES[kind].config.__name__})")
    _POLICIES[kind] = RegisteredPolicy(kind=kind, config=config, policy=policy, step=step)


def registered_policies() -> tuple[RegisteredPolicy, ...]:
    """In registration order."""
    return tuple(_POLICIES.values())


def make_policy(config: PolicyConfig) -> Policy:
    entry = _POLICIES.get(config.kind)
    if entry is None or not isinstance(config, entry.config):
        raise TypeError(f"no policy implements config kind {config.kind!r}")
    return entry.policy(config)


def _union(configs: tuple[type[PolicyConfig], ...]) -> Any:
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007 (a Union of a runtime tuple of classes)


def policy_config_union() -> Any:
    """The discriminated union of every registered config, in registration order.

    Configs that refer to ``StepConfig`` (the union of the step policies) are
    completed here first.
    """
    steps = _union(tuple(p.config for p in _POLICIES.values() if p.step))
    for p in _POLICIES.values():
        if not p.config.__pydantic_complete__:
            p.config.model_rebuild(_types_namespace={"StepConfig": steps})
    return _union(tuple(p.config for p in _POLICIES.values()))
