"""Where the reader gets an adapter's files from: an :class:`AdapterDirectory`.

The reader never opens a path itself: a source that has opened a tenant's directory from a
descriptor (``sources.local``) hands the reader that descriptor, so the bytes read and the
identity the policy was chosen by come from the same opened directory. :class:`PathDirectory`
is the by-path form for directories the caller trusts (an operator's ``vllm-safelora project
DIR``, hub snapshots the server downloaded itself): links are followed, and a ``confine_to``
directory bounds where they may lead.

This module imports no vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..errors import AdapterRefused, RefusalReason
from ..fsutil import FileIdentity

_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class AdapterDirectory(Protocol):
    path: Path
    """How messages and the cache index name the directory."""

    def open_file(self, name: str, adapter: str) -> int | None:
        """A read-only descriptor of the file ``name`` in the directory (the caller closes it), or None
        if there is none. Raises AdapterRefused (never OSError) for a file that may not be read."""

    def identity(self) -> FileIdentity | None:
        """The directory's own identity (its times move when a file is added, removed or renamed in
        it), or None where there is none to trust (then the upload is always read)."""

    def lexists(self, name: str) -> bool:
        """Whether the directory has an entry ``name`` (of any type, a dangling link included)."""


class PathDirectory:
    """An adapter directory named by a path the caller trusts; files resolved with ``realpath``."""

    def __init__(self, path: Path | str, confine_to: Path | None = None):
        self.path = Path(path)
        self.confine_to = confine_to

    def check(self, adapter: str) -> None:
        if not self.path.is_dir():
            raise AdapterRefused(RefusalReason.NOT_FOUND, f"{self.path} is not a directory", adapter)

    def lexists(self, name: str) -> bool:
        return os.path.lexists(self.path / name)

    def identity(self) -> FileIdentity | None:
        try:
            return FileIdentity.of(os.stat(self.path))
        except OSError:
            return None

    def open_file(self, name: str, adapter: str) -> int | None:
        path = self.path / name
        try:
            real = Path(os.path.realpath(path))
            if self.confine_to is not None:
                root = Path(os.path.realpath(self.confine_to))
                if real != root and root not in real.parents:
                    raise AdapterRefused(
                        RefusalReason.OUTSIDE_NAMESPACE,
                        f"{name} is a link pointing outside the adapter source",
                        adapter,
                    )
            return os.open(real, _FILE_FLAGS | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AdapterRefused(RefusalReason.NOT_FOUND, f"cannot open {name}: {exc.strerror}", adapter) from None


def as_directory(where: AdapterDirectory | Path | str, confine_to: Path | None = None) -> AdapterDirectory:
    if isinstance(where, (str, os.PathLike)):
        return PathDirectory(where, confine_to)
    return where
