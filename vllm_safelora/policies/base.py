"""The policy interface: an adapter and a bank in, the transformed adapter and its report out.

A new policy is a new file with a config class and an ``apply``; nothing in
the vLLM integration changes.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from ..adapters import LoraAdapter
from ..bank import AlignmentBank
from ..report import ModuleReport


class PolicyConfig(BaseModel):
    """Base for every policy's settings; frozen and hashable into a stable id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str

    def policy_id(self) -> str:
        """Stable digest of the settings: part of the cache key."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyResult:
    tensors: dict[str, torch.Tensor]
    """The adapter's tensors after the policy (same names; projected ones replaced)."""
    modules: list[ModuleReport]
    changed: bool
    notes: list[str]


class Policy(abc.ABC):
    name: str

    @abc.abstractmethod
    def apply(self, adapter: LoraAdapter, bank: AlignmentBank) -> PolicyResult: ...
