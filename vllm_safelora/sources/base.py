"""What every adapter source is: the :class:`AdapterSource` interface and the :class:`Location` it returns."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

from ..adapters.directory import AdapterDirectory, PathDirectory


@dataclass(frozen=True)
class Location:
    """Where an adapter's bytes come from. Tenant rules match ``identity``, never a name
    an API client chose: the served name of a load request is only a label."""

    source: AdapterSource
    path: Path
    """The real directory holding the adapter's files."""
    name: str
    """How the source names it: ``tenant/adapter`` under a local root, or ``hub:org/repo``."""
    identity: str
    """Where the files really are: the real path under the root (a link ``tenant/current`` ->
    ``tenant/v3`` has identity ``tenant/v3``), or ``hub:org/repo``. What tenant rules match."""
    confine: Path | None
    """Every file the reader opens must resolve inside this directory."""
    namespace: str | None = None
    """The tenant the adapter was asked for as (:func:`.names.namespace_of`): where links may lead."""

    def open(self) -> contextlib.AbstractContextManager[AdapterDirectory]:
        """The directory to read the files from, opened as the source opens it."""
        return self.source.open(self)


class AdapterSource(abc.ABC):
    """One place adapters can come from.

    ``prefix``: names starting with it belong to this source exclusively (e.g. ``hub:``);
    ``None`` for sources that take plain names. ``locate_adapter`` uses it to pick the
    sources that are meant to serve a name, so a hub name is never looked up on disk.
    """

    kind: str
    prefix: str | None = None
    remote: bool = False
    """True for sources whose files are downloaded by :meth:`open` (object storage), not found on disk."""

    @abc.abstractmethod
    def locate(self, name: str) -> Path | None:
        """Local directory holding the adapter's files, or ``None`` if this source lacks it.

        Raises ``AdapterRefused(INVALID_NAME)`` if the name is illegal for this source,
        and ``AdapterRefused(NOT_FOUND)`` with a message for other failures to fetch it.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """Short operator-facing description, used in "not found" messages."""

    def claims(self, name: str) -> bool:
        """True if ``name`` is addressed to this source by its prefix."""
        return bool(self.prefix) and isinstance(name, str) and name.startswith(self.prefix)

    @abc.abstractmethod
    def location(self, name: str, path: Path) -> Location:
        """The :class:`Location` of an adapter this source located as ``name`` at ``path``."""

    @contextlib.contextmanager
    def open(self, location: Location) -> Iterator[AdapterDirectory]:
        """The directory the reader reads ``location``'s files from. By path, for sources whose
        files no tenant can change under the server (a hub snapshot is the pinned revision the
        server downloaded itself); a source of tenant-writable files opens them from a descriptor."""
        yield PathDirectory(location.path, location.confine)

    def location_of(self, path: str) -> Location | None:
        """The location of an explicit ``lora_path`` if this source holds it, else None."""
        return None
