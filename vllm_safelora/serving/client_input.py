"""What API clients may send as a served adapter name or a ``lora_path``, checked before anything else.

Served names and paths end up in logs, metrics and HTTP responses, so only printable
text of bounded length passes; anything else is refused with ``INVALID_NAME``.
"""

from __future__ import annotations

from ..errors import AdapterRefused, RefusalReason
from ..sources import shown_name

# Printable text of bounded length only (no NUL, newlines, escapes).
MAX_SERVED_NAME = 256
MAX_LORA_PATH = 4096


def check_served_name(name: object) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_SERVED_NAME or not name.isprintable():
        why = (
            f"is {len(name)} characters long (at most {MAX_SERVED_NAME})"
            if isinstance(name, str) and len(name) > MAX_SERVED_NAME
            else "must be non-empty printable text without control characters"
        )
        raise AdapterRefused(RefusalReason.INVALID_NAME, f"invalid adapter name: {why}", adapter=shown_name(name))


def check_lora_path(lora_path: object) -> None:
    if not isinstance(lora_path, str) or not lora_path.isprintable():
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path {shown_name(lora_path)} contains control characters (or is not text)",
        )
    if len(lora_path) > MAX_LORA_PATH:
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path is {len(lora_path)} characters long, too long (at most {MAX_LORA_PATH})",
        )
