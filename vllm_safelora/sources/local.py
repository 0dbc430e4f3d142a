"""Adapters in a local directory: ``<root>/<adapter>`` or ``<root>/<tenant>/<adapter>``, confined to the root."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterRefused, ConfigError, RefusalReason
from .base import AdapterSource, Location
from .names import shown_name, validate_adapter_name


@dataclass(frozen=True)
class _ResolvedRoot:
    given: Path
    real: str  # realpath of the root; containment is checked against it


class LocalDirSource(AdapterSource):
    """Adapters stored as ``<root>/<adapter>`` or ``<root>/<tenant>/<adapter>``.

    Symlinks are allowed as long as they resolve inside the root: operators often
    link versions (``tenant/current -> tenant/v3``). A link leading outside is refused.
    """

    kind = "local"

    def __init__(self, root: Path | str):
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(
                f"adapter directory {str(root)!r} does not exist or is not a directory; "
                "create it or point the local adapter source at an existing directory"
            )
        self._root = _ResolvedRoot(given=root, real=os.path.realpath(root))

    @property
    def root(self) -> Path:
        return self._root.given

    def describe(self) -> str:
        return f"local directory {str(self._root.given)!r}"

    def contains(self, real: str) -> bool:
        root = self._root.real
        return real != root and os.path.commonpath([root, real]) == root

    def location(self, name: str, path: Path) -> Location:
        identity = os.path.relpath(os.path.realpath(path), self._root.real).replace(os.sep, "/")
        return Location(source=self, path=Path(path), name=name, identity=identity, confine=self._root.given)

    def location_of(self, path: str) -> Location | None:
        real = os.path.realpath(path)
        if not self.contains(real):
            return None
        if not os.path.isdir(real):
            raise AdapterRefused(RefusalReason.NOT_FOUND, f"lora_path {shown_name(path)} is not a directory")
        # The name is the path as given under the root (a link keeps its own name);
        # the identity, which policies follow, is where it really leads.
        given = os.path.normpath(os.path.abspath(path))
        relative = (os.path.relpath(given, root) for root in (os.path.abspath(self._root.given), self._root.real))
        name = next((rel.replace(os.sep, "/") for rel in relative if not rel.startswith("..")), None)
        located = self.location(name or "", Path(real))
        return located if name else dataclasses.replace(located, name=located.identity)


    def locate(self, name: str) -> Path | None:
        validate_adapter_name(name)
        root_real = self._root.real
        candidate = os.path.join(root_real, *name.split("/"))
        # realpath resolves every symlink, including dangling ones, so containment is
        # decided on where the name really leads, not on how it is spelled.
        real = os.path.realpath(candidate)
        if real == root_real or os.path.commonpath([root_real, real]) != root_real:
            raise AdapterRefused(
                RefusalReason.INVALID_NAME,
                f"adapter name {shown_name(name)} resolves outside the adapter directory",
                adapter=name,
            )
        if not os.path.exists(real):
            return None
        if not os.path.isdir(real):
            raise AdapterRefused(
                RefusalReason.NOT_FOUND,
                f"{shown_name(name)} exists in the adapter directory but is not a directory "
                "(an adapter is a directory holding adapter_config.json and its weights)",
                adapter=name,
            )
        return Path(real)
