"""Opening a tenant's path under an adapter root one component at a time, from a descriptor.

``realpath``, then a containment check, then ``open`` is three looks at a path a tenant can
change between them (``renameat2(RENAME_EXCHANGE)`` swaps a directory and a symlink
atomically): the check passes on one tree and the open reads another. Here every component
is opened with ``openat(parent_fd, component, O_NOFOLLOW)``, so what is opened is exactly
what was looked at. A symlink is never followed by the kernel: its text is read
(``readlinkat``), decided on, and the resulting path is walked again from the root under
the same rules.

The decision on a link is made from its text alone, before anything it names is opened: a
link may lead only into the namespace of the tenant whose adapter is being opened, or into
an operator-shared area (``shared_adapters`` globs); anything else is refused as
``outside_namespace`` whether or not the target exists, so a refusal tells a tenant nothing
about another tenant's files. ``..`` in a link's text is taken lexically against the
directory holding the link (the directory it was found in is a real one, opened without
following anything), so a link can never climb above the root.

This module imports no vLLM.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from fnmatch import fnmatchcase
from collections.abc import Sequence

from ..errors import AdapterRefused, RefusalReason
from .names import shown_name

# Links followed while opening one path (the kernel allows 40; operators' version links
# are one or two deep, and every hop costs a walk from the root).
MAX_LINK_HOPS = 8
# A path is walked again when a component is swapped between the open that found a link
# and the readlink that reads it; a tenant racing on purpose gets a refusal after this many.
_MAX_RETRIES = 4
# Components a walked path may contain (link texts included): plain ASCII that starts
# with a letter or digit, so hidden files, control characters and odd encodings never
# become part of an identity that tenant rules match and logs print.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted as a weights file must not block the reader.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Namespace:
    """What one adapter's paths may reach: its tenant's own namespace and the shared areas.

    ``own`` is the first component of the adapter's name under the root (``acme`` for
    ``acme/bot``; an adapter named without a tenant level is its own namespace).
    ``shared`` are the operator's ``shared_adapters`` globs, matched against a path under
    the root or any of its ancestors (``public/*`` admits ``public/base`` and what is in it).
    """

    own: str
    shared: tuple[str, ...] = ()

    def admits(self, parts: Sequence[str]) -> bool:
        if parts and parts[0] == self.own:
            return True
        return any(fnmatchcase("/".join(parts[:k]), glob) for k in range(1, len(parts) + 1) for glob in self.shared)


def outside_namespace(who: str, link: str, namespace: Namespace) -> AdapterRefused:
    shared = f" or into the shared areas {list(namespace.shared)}" if namespace.shared else ""
    return AdapterRefused(
        RefusalReason.OUTSIDE_NAMESPACE,
        f"the link {link} points outside the tenant's namespace '{namespace.own}/'; links may point only "
        f"inside it{shared}. Replace the link with the files, or ask the operator to share the target",
        who,
    )


@dataclass(frozen=True)
class RootPaths:
    """The spellings of an adapter root an absolute link text may start with (as given, and real)."""

    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, given: str, real: str) -> RootPaths:
        return cls(tuple(dict.fromkeys((posixpath.normpath(os.path.abspath(given)), real))))

    def relative(self, absolute: str) -> list[str] | None:
        """Components of a normalised absolute path under the root, or None if it is not under it."""
        for prefix in self.prefixes:
            if absolute == prefix:
                return []
            if absolute.startswith(prefix.rstrip("/") + "/"):
                return [p for p in absolute[len(prefix) :].split("/") if p]
        return None


def normalised(parts: Sequence[str]) -> list[str] | None:
    """``parts`` with ``.`` and ``..`` taken lexically; None if ``..`` climbs above the start."""
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(part)
    return out


@dataclass(frozen=True)
class _Again:
    """Walk again: along ``link`` (a link's target followed by the rest of the path), or the same path."""

    link: list[str] | None = None


@dataclass
class _Walk:
    root_fd: int
    roots: RootPaths
    namespace: Namespace
    who: str
    follow: bool

    def refuse(self, reason: RefusalReason, detail: str) -> AdapterRefused:
        return AdapterRefused(reason, detail, self.who)

    def check_parts(self, parts: Sequence[str], spelled: str) -> None:
        for part in parts:
            if not _COMPONENT_RE.fullmatch(part):
                raise self.refuse(
                    RefusalReason.INVALID_NAME,
                    f"{spelled} has a path component {shown_name(part)} that is not a plain name (ASCII letters, "
                    "digits, '.', '_', '-', starting with a letter or digit, at most 255 characters)",
                )

    def link_target(self, parent: Sequence[str], at: str, text: str) -> list[str]:
        """Where a link's text leads, as components under the root; refused unless the namespace admits it."""
        shown = f"{shown_name('/'.join([*parent, at]))} -> {shown_name(text)}"
        if text.startswith("/"):
            target = self.roots.relative(posixpath.normpath(text))
        else:
            target = normalised([*parent, *text.split("/")])
        if target is None or not self.namespace.admits(target):
            raise outside_namespace(self.who, shown, self.namespace)
        self.check_parts(target, f"the link {shown}")
        return target

    def open(self, parts: list[str], *, want_dir: bool) -> tuple[int, list[str]] | None:
        """(fd, the real components opened) of ``parts`` under the root; None if a component is missing."""
        hops = retries = 0
        while True:
            step = self._try(parts, want_dir)
            if not isinstance(step, _Again):
                return step
            if step.link is None:
                retries += 1
                if retries > _MAX_RETRIES:
                    raise self.refuse(
                        RefusalReason.CHANGED_WHILE_READING,
                        "the adapter's path kept changing while it was opened (a directory swapped with a link); "
                        "stop changing it and try again",
                    )
                continue
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise self.refuse(
                    RefusalReason.INVALID_NAME, f"more than {MAX_LINK_HOPS} links are chained on the adapter's path"
                )
            parts = step.link

    def _try(self, parts: list[str], want_dir: bool) -> tuple[int, list[str]] | None | _Again:
        """One walk: the opened result, None (missing), or walk again (a link's new path, or a retry)."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = _FILE_FLAGS if last and not want_dir else _DIR_FLAGS
                try:
                    nxt = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        return None
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise self.refuse(
                            RefusalReason.NOT_FOUND,
                            f"cannot open {shown_name('/'.join(parts[: i + 1]))}: {exc.strerror}",
                        ) from None
                    return self._not_opened(fd, parts, i, want_dir=want_dir or not last)
                os.close(fd)
                fd = nxt
            out, fd = fd, -1
            return out, list(parts)
        finally:
            if fd >= 0:
                os.close(fd)

    def _not_opened(self, parent_fd: int, parts: list[str], i: int, *, want_dir: bool):
        """A component that is a link (or, for a directory, not one): the link's new path, or a refusal."""
        try:
            text = os.readlink(parts[i], dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno != errno.EINVAL:
                raise self.refuse(
                    RefusalReason.NOT_FOUND, f"cannot read {shown_name('/'.join(parts[: i + 1]))}: {exc.strerror}"
                ) from None
            # Not a link: a non-directory where a directory was needed, or it was a link a moment
            # ago and has been swapped back; a second look decides.
            try:
                st = os.stat(parts[i], dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                return _Again()
            if want_dir and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                raise self.refuse(
                    RefusalReason.NOT_FOUND,
                    f"{shown_name('/'.join(parts[: i + 1]))} exists but is not a directory (an adapter is a "
                    "directory holding adapter_config.json and its weights)",
                ) from None
            return _Again()
        if not self.follow:
            raise self.refuse(
                RefusalReason.CHANGED_WHILE_READING,
                f"{shown_name('/'.join(parts[: i + 1]))} became a link after the adapter was located; try again",
            )
        return _Again(self.link_target(parts[:i], parts[i], text) + parts[i + 1 :])


def open_under(
    root_fd: int,
    roots: RootPaths,
    parts: Sequence[str],
    namespace: Namespace,
    *,
    who: str,
    want_dir: bool = True,
    follow: bool = True,
) -> tuple[int, list[str]] | None:
    """Open ``parts`` (components under the root, no ``..``) from ``root_fd``, following links
    only as this module's docstring says. Returns (fd, real components) or None if missing.

    ``follow=False`` refuses any link (``changed_while_reading``): for re-opening a path that
    was located already, whose components are real directories unless someone swapped them.
    Raises AdapterRefused (``outside_namespace``, ``invalid_name``, ``not_found``,
    ``changed_while_reading``); never an OSError.
    """
    walk = _Walk(root_fd, roots, namespace, who, follow)
    walk.check_parts(parts, f"the adapter path {shown_name('/'.join(parts))}")
    return walk.open(list(parts), want_dir=want_dir)
