"""Adapters in a local directory: ``<root>/<adapter>`` or ``<root>/<tenant>/<adapter>``, each tenant
confined to its own namespace under the root (and the operator's shared areas)."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence

from ..errors import AdapterRefused, ConfigError, RefusalReason
from ..fsutil import FileIdentity
from .base import AdapterSource, Location
from .confined import _FILE_FLAGS, Namespace, RootPaths, _Walk, open_under
from .names import namespace_of, shown_name, validate_adapter_name


class OpenedDirectory:
    """An adapter directory opened from the root's descriptor: the reader's files are opened relative
    to it, and a file that is a link is resolved under the same namespace rules as the directory."""

    def __init__(self, fd: int, parts: list[str], walk: _Walk, root: Path):
        self.fd = fd
        self.parts = parts
        self.path = root.joinpath(*parts)
        self._walk = walk

    def identity(self) -> FileIdentity | None:
        try:
            return FileIdentity.of(os.fstat(self.fd))
        except OSError:
            return None

    def lexists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def open_file(self, name: str, adapter: str) -> int | None:
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno != errno.ELOOP:
                raise AdapterRefused(RefusalReason.NOT_FOUND, f"cannot open {name}: {exc.strerror}", adapter) from None
        try:
            text = os.readlink(name, dir_fd=self.fd)
        except OSError:
            raise AdapterRefused(
                RefusalReason.CHANGED_WHILE_READING, f"{name} changed while it was opened; try again", adapter
            ) from None
        opened = self._walk.open(self._walk.link_target(self.parts, name, text), want_dir=False)
        return None if opened is None else opened[0]


@dataclass(frozen=True)
class _Root:
    given: Path
    paths: RootPaths

    @property
    def real(self) -> str:
        return self.paths.prefixes[-1]


class LocalDirSource(AdapterSource):
    """Adapters stored as ``<root>/<adapter>`` or ``<root>/<tenant>/<adapter>``.

    Symlinks are allowed inside a tenant's namespace (operators link versions:
    ``tenant/current -> tenant/v3``) and into ``shared`` areas (globs on paths under the
    root); any other link is refused as ``outside_namespace`` (``sources.confined``).
    Every path is opened component by component from the root's descriptor, and a
    location's identity is the real path that was opened.
    """

    kind = "local"

    def __init__(self, root: Path | str, shared: Sequence[str] = ()):
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(
                f"adapter directory {str(root)!r} does not exist or is not a directory; "
                "create it or point the local adapter source at an existing directory"
            )
        if isinstance(shared, str):
            raise ConfigError("shared_adapters must be a list of globs, not a string")
        self.shared = tuple(shared)
        self._root = _Root(given=root, paths=RootPaths.of(str(root), os.path.realpath(root)))

    @property
    def root(self) -> Path:
        return self._root.given

    def describe(self) -> str:
        return f"local directory {str(self._root.given)!r}"

    @contextlib.contextmanager
    def _root_fd(self) -> Iterator[int]:
        try:
            fd = os.open(self._root.real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # the operator's root went away: not the tenant's doing, but not a crash either
            raise AdapterRefused(
                RefusalReason.NOT_FOUND,
                f"the adapter directory {str(self._root.given)!r} cannot be opened "
                f"({exc.strerror}); the operator must restore it",
            ) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(self, root_fd: int, namespace: str, who: str, follow: bool) -> _Walk:
        return _Walk(root_fd, self._root.paths, Namespace(namespace, self.shared), who, follow)

    def _resolve(self, parts: list[str], who: str) -> list[str] | None:
        """The real components under the root that ``parts`` lead to (links followed under the rules)."""
        with self._root_fd() as root_fd:
            opened = open_under(root_fd, self._root.paths, parts, Namespace(parts[0], self.shared), who=who)
            if opened is None:
                return None
            os.close(opened[0])
            return opened[1]

    def location(self, name: str, path: Path) -> Location:
        """``path`` as :meth:`locate` returned it: the root joined with the real components."""
        identity = posixpath.relpath(str(path), str(self._root.given)).replace(os.sep, "/")
        return Location(
            source=self,
            path=Path(path),
            name=name,
            identity=identity,
            confine=self._root.given,
            namespace=namespace_of(name),
        )

    def holds(self, path: str) -> bool:
        """Whether ``path``, as written (made absolute, ``..`` taken lexically), lies under this root."""
        return bool(self._root.paths.relative(posixpath.normpath(os.path.abspath(path))))

    def location_of(self, path: str) -> Location | None:
        # Decided on the path as written: which root it is under, and which namespace it names;
        # the walk then decides where it really leads.
        given = self._root.paths.relative(posixpath.normpath(os.path.abspath(path)))
        if given is None:
            return None
        if not given:
            raise AdapterRefused(
                RefusalReason.NOT_FOUND, f"lora_path {shown_name(path)} is the adapter directory itself"
            )
        real = self._resolve(given, shown_name(path))
        if real is None:
            raise AdapterRefused(RefusalReason.NOT_FOUND, f"lora_path {shown_name(path)} does not exist")
        name = "/".join(given)
        return Location(
            source=self,
            path=self._root.given.joinpath(*real),
            name=name,
            identity="/".join(real),
            confine=self._root.given,
            namespace=given[0],
        )

    def locate(self, name: str) -> Path | None:
        validate_adapter_name(name)
        real = self._resolve(name.split("/"), name)
        return None if real is None else self._root.given.joinpath(*real)

    @contextlib.contextmanager
    def open(self, location: Location) -> Iterator[OpenedDirectory]:
        """The located directory, opened again from the root without following any link: its
        components are real directories, so a link found now was swapped in since it was located
        (``changed_while_reading``), and what is read is what the identity names."""
        parts = location.identity.split("/")
        who = location.name
        with self._root_fd() as root_fd:
            walk = self._walk(root_fd, location.namespace or parts[0], who, follow=False)
            walk.check_parts(parts, f"the adapter path {shown_name(location.identity)}")
            opened = walk.open(parts, want_dir=True)
            if opened is None:
                raise AdapterRefused(
                    RefusalReason.CHANGED_WHILE_READING,
                    f"{location.identity} vanished after it was located; try again",
                    who,
                )
            # Links inside the directory (weights kept elsewhere) are followed under the namespace rules.
            walk.follow = True
            directory = OpenedDirectory(opened[0], opened[1], walk, self._root.given)
            try:
                yield directory
            finally:
                os.close(directory.fd)
