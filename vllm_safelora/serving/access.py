"""What a caller may use: the base model, its own namespace's adapters, the operator's shared areas.

Decided from the name alone, before anything is looked up, so an adapter of another
tenant and a name that exists nowhere take the same path and get the same answer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from ..sources.names import namespace_of
from .credentials import Identity

OPEN = Identity(role="admin", name="(auth off)", via="auth off")
"""The caller when authentication is off: every adapter, as before tenants had keys."""


def shared(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def tenant_of(name: str, tenant_prefixes: Sequence[str] = ()) -> str:
    """The namespace a served name belongs to: ``acme`` for ``acme/bot`` and for an object-store
    name ``s3:acme/bot``; a hub name keeps its source (``hub:org``), which is no tenant's."""
    for prefix in tenant_prefixes:
        if prefix and name.startswith(prefix):
            return namespace_of(name[len(prefix) :])
    return namespace_of(name)


def may_use(caller: Identity, name: str, shared_globs: Sequence[str], tenant_prefixes: Sequence[str] = ()) -> bool:
    """May ``caller`` name adapter ``name`` (a served name, which is its location under
    served_names: location)? Operators may use every adapter. ``tenant_prefixes``: sources whose
    names carry the tenant after their prefix (object storage, ``s3:``)."""
    if caller.admin:
        return True
    if not isinstance(name, str) or not name:
        return False
    return tenant_of(name, tenant_prefixes) == caller.name or shared(name, shared_globs)


def may_use_in(caller: Identity, name: str, settings) -> bool:
    """:func:`may_use` with the server's shared areas and object-store prefix."""
    s3 = getattr(settings, "s3", None)
    return may_use(caller, name, settings.shared_adapters, (s3.prefix,) if s3 is not None else ())


def owns(caller: Identity, name: str) -> bool:
    """May ``caller`` write or delete adapter ``name`` (``tenant/adapter`` in its own namespace)?"""
    return caller.role == "tenant" and isinstance(name, str) and "/" in name and namespace_of(name) == caller.name
