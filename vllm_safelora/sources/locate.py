"""Finding an adapter among the configured sources: by name, or by an explicit ``lora_path``."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

from ..errors import AdapterRefused, ConfigError, RefusalReason
from .base import AdapterSource, Location
from .hub import HubSource
from .local import LocalDirSource
from .names import shown_name


def locate(sources: Sequence[AdapterSource], name: str) -> Location:
    """:func:`locate_adapter` as a :class:`Location`."""
    source, path = locate_adapter(sources, name)
    return source.location(name, path)


def locate_path(sources: Sequence[AdapterSource], lora_path: str) -> Location:
    """The location of an explicit ``lora_path`` (load endpoint, ``--lora-modules``, offline
    requests): a directory under a local root, an allowed hub repository id, or a remote
    source's adapter (``s3:tenant/adapter`` or its full ``s3://`` URI)."""
    for source in sources:
        if source.remote and (found := source.location_of(lora_path)) is not None:
            return found
    try:
        candidate = Path(lora_path).expanduser()
        # Decided on the text, never by looking: whether some path outside the roots exists
        # must not change the answer (a relative path is local when it lies under a root).
        local = candidate.is_absolute() or any(
            isinstance(s, LocalDirSource) and s.holds(str(candidate)) for s in sources
        )
    except (OSError, ValueError) as exc:  # e.g. a NUL byte: the client's path, a 4xx
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path {shown_name(lora_path)} cannot be used ({getattr(exc, 'strerror', None) or exc})",
        ) from None
    if local:
        for source in sources:
            found = source.location_of(str(candidate))
            if found is not None:
                return found
        roots = [str(s.root) for s in sources if isinstance(s, LocalDirSource)]
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path {shown_name(lora_path)} is outside the configured adapter_dirs; only adapters under {roots} can be loaded",
        )
    hub = next((s for s in sources if isinstance(s, HubSource)), None)
    if hub is not None:
        ref = lora_path if lora_path.startswith(hub.prefix) else hub.prefix + lora_path
        path = hub.locate(ref)
        if path is not None:
            return hub.location(ref, path)
    raise AdapterRefused(
        RefusalReason.NOT_FOUND,
        f"lora_path {shown_name(lora_path)} is not a local directory"
        + (" and not an allowed, available hub repository" if hub else " (hub sources are disabled)"),
    )


def locate_adapter(sources: Sequence[AdapterSource], name: str) -> tuple[AdapterSource, Path]:
    """Find ``name`` in the first source that has it.

    A name carrying a source's prefix (``hub:...``) is looked up only in the sources
    with that prefix; any other name only in the unprefixed sources. An illegal name is
    refused by the first source asked (fail closed: we do not try to find some other
    source that would accept it). Not found anywhere: ``AdapterRefused(NOT_FOUND)``.
    """
    if not sources:
        raise ConfigError("no adapter sources are configured")
    claimed = [s for s in sources if s.claims(name)]
    candidates = claimed or [s for s in sources if not s.prefix]
    if not candidates:
        prefixes = sorted({s.prefix for s in sources if s.prefix})
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"adapter names on this server start with one of {prefixes}",
        )
    for source in candidates:
        try:
            path = source.locate(name)
        except AdapterRefused as exc:
            # An invalid name is shown only in its escaped form (in the detail): the raw
            # string may hold control characters that do not belong in logs or HTTP.
            if exc.reason is not RefusalReason.INVALID_NAME:
                exc.for_adapter(name)
            raise
        if path is not None:
            return source, path
    searched = "; ".join(s.describe() for s in candidates)
    raise AdapterRefused(
        RefusalReason.NOT_FOUND,
        f"no adapter with this name (searched: {searched})",
        adapter=name,
    )
