"""Adapter names from tenants: the legal local names, and how an untrusted name is shown.

An illegal name is refused with ``RefusalReason.INVALID_NAME`` before it touches the
filesystem or the network, and never silently mapped to something else.
"""

from __future__ import annotations

import re

from ..errors import AdapterRefused, RefusalReason

# One path component of a local adapter name. ASCII only, and starting with an
# alphanumeric so "." / ".." / hidden files can never be named. Used with fullmatch:
# a "$" anchor would accept a trailing newline.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# adapter or tenant/adapter: two components of 64 plus the slash.
MAX_NAME_LENGTH = 129


def shown_name(name: object, limit: int = 80) -> str:
    """A printable, bounded rendering of an untrusted name for messages and logs."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def namespace_of(name: str) -> str:
    """The tenant namespace of a local adapter name: its first component (``acme`` for
    ``acme/bot``); an adapter named without a tenant level is its own namespace. Hub names
    (``hub:org/repo``) have ``hub:org`` (the org), object-store names ``s3:tenant``."""
    return name.split("/", 1)[0]


def refuse_name(name: object, why: str) -> AdapterRefused:
    return AdapterRefused(RefusalReason.INVALID_NAME, f"invalid adapter name {shown_name(name)}: {why}")


def validate_adapter_name(name: object) -> None:
    """Check a *local* adapter name: ``adapter`` or ``tenant/adapter``.

    Raises ``AdapterRefused(INVALID_NAME)`` saying what is wrong. No decoding of any
    kind (URL, unicode normalisation) is performed, so encoded tricks such as
    ``%2e%2e`` are simply invalid rather than interpreted.
    """
    if not isinstance(name, str):
        raise refuse_name(name, f"must be a string, not {type(name).__name__}")
    if not name:
        raise refuse_name(name, "is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise refuse_name(name, f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})")
    # The specific checks below only exist to give a precise message; the component
    # regex would reject all of these characters anyway.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise refuse_name(name, "contains control characters")
    if "\\" in name:
        raise refuse_name(name, "contains a backslash")
    if "%" in name:
        raise refuse_name(name, "contains '%' (names are never URL-decoded)")
    if name.startswith("/"):
        raise refuse_name(name, "is an absolute path")
    if name.endswith("/"):
        raise refuse_name(name, "ends with '/'")
    parts = name.split("/")
    if len(parts) > 2:
        raise refuse_name(name, "has more than one '/' (use 'adapter' or 'tenant/adapter')")
    for part in parts:
        if not part:
            raise refuse_name(name, "has an empty path component")
        if ".." in part:
            raise refuse_name(name, "contains '..'")
        if not _COMPONENT_RE.fullmatch(part):
            raise refuse_name(
                name,
                f"component {shown_name(part)} must start with a letter or digit and use only "
                "A-Z a-z 0-9 . _ - (1 to 64 characters)",
            )
