"""Policies are registered, not dispatched: one register_policy call makes a kind
parseable (alone and as a chain step) and buildable, with no other file touched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pytest
from pydantic import TypeAdapter, ValidationError

from vllm_safelora.policies import (
    ChainConfig,
    ChainPolicy,
    Policy,
    PolicyConfig,
    PolicyResult,
    SafeLoRAConfig,
    SafeLoRAPolicy,
    make_policy,
    parse_policy,
    register_policy,
    registry,
)

if TYPE_CHECKING:  # at run time the registry resolves StepConfig (registry.policy_config_union)
    StepConfig = PolicyConfig


class ToyConfig(PolicyConfig):
    kind: Literal["toy"] = "toy"
    strength: int = 1


class ToyPolicy(Policy):
    name = "toy"

    def __init__(self, config: ToyConfig):
        self.config = config

    def apply(self, adapter, bank) -> PolicyResult:  # pragma: no cover - never applied here
        return PolicyResult(tensors=dict(adapter.tensors), modules=[], changed=False, notes=[])


def test_every_kind_is_registered_once_and_builds_its_policy():
    kinds = [p.kind for p in registry.registered_policies()]
    assert kinds == ["safelora", "splora", "salora-style", "salora-select", "chain"]
    for entry in registry.registered_policies():
        config = parse_policy(
            {
                "kind": entry.kind,
                **({"steps": [{"kind": "safelora"}]} if entry.kind == "chain" else {}),
                **({"topk": 1} if entry.kind == "salora-select" else {}),
            }
        )
        assert type(config) is entry.config
        assert type(make_policy(config)) is entry.policy
    chain = make_policy(ChainConfig(steps=[SafeLoRAConfig()]))
    assert isinstance(chain, ChainPolicy) and isinstance(chain.steps[0], SafeLoRAPolicy)


def test_register_policy_refuses_a_wrong_or_repeated_kind():
    with pytest.raises(ValueError, match="defaults to 'toy'"):
        register_policy("other", ToyConfig, ToyPolicy)
    with pytest.raises(ValueError, match="already registered"):
        register_policy("safelora", SafeLoRAConfig, SafeLoRAPolicy)
    with pytest.raises(TypeError, match="no policy implements config kind 'toy'"):
        make_policy(ToyConfig())


def test_one_registration_call_adds_a_policy(monkeypatch):
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))
    register_policy("toy", ToyConfig, ToyPolicy)

    class ToyChain(ChainConfig):  # a chain type built after the registration sees the new step
        kind: Literal["toy-chain"] = "toy-chain"
        steps: tuple[StepConfig, ...]

    register_policy("toy-chain", ToyChain, ChainPolicy, step=False)
    any_policy = TypeAdapter(registry.policy_config_union())
    assert any_policy.validate_python({"kind": "toy", "strength": 3}) == ToyConfig(strength=3)
    chain = any_policy.validate_python({"kind": "toy-chain", "steps": [{"kind": "toy"}, {"kind": "safelora"}]})
    assert chain.steps == (ToyConfig(), SafeLoRAConfig())
    assert isinstance(make_policy(chain).steps[0], ToyPolicy)
    with pytest.raises(ValidationError):  # chains are not steps
        any_policy.validate_python({"kind": "toy-chain", "steps": [{"kind": "toy-chain", "steps": [{"kind": "toy"}]}]})
