"""What a caller may use: the base model, its own namespace's adapters, the operator's shared areas.

Decided from the name alone, before anything is looked up, so an adapter of another
tenant and a name that exists nowhere take the same path and get the same answer.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from ..sources.names import namespace_of
from .credentials import Identity

OPEN = Identity(role="admin", name="(auth off)", via="auth off")
"""The caller when authentication is off: every adapter, as before tenants had keys."""


def shared(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def may_use(caller: Identity, name: str, shared_globs: Sequence[str]) -> bool:
    """May ``caller`` name adapter ``name`` (a served name, which is its location under
    served_names: location)? Operators may use every adapter."""
    if caller.admin:
        return True
    if not isinstance(name, str) or not name:
        return False
    return namespace_of(name) == caller.name or shared(name, shared_globs)


def owns(caller: Identity, name: str) -> bool:
    """May ``caller`` write or delete adapter ``name`` (``tenant/adapter`` in its own namespace)?"""
    return caller.role == "tenant" and isinstance(name, str) and "/" in name and namespace_of(name) == caller.name
