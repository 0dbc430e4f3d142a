"""Where adapters come from: turn a tenant-supplied adapter name into a local directory.

A source only *locates* files; it never parses them (that is the adapter reader's job)
and never trusts the name. Two rules hold for every source:

* the name is validated before it touches the filesystem or the network, and an illegal
  name is refused with ``RefusalReason.INVALID_NAME`` (never silently mapped to something);
* "this source does not have it" is ``None``, so several sources can be searched in order;
  anything else that goes wrong is an ``AdapterRefused`` with a message, never a stack trace.

vLLM's own filesystem resolver joins the name onto its directory unchecked and lets the
worker fetch any non-local ``lora_path`` from the hub; this module is the replacement.
"""

from __future__ import annotations

import abc
import dataclasses
import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import AdapterRefused, ConfigError, RefusalReason

logger = logging.getLogger(__name__)

# One path component of a local adapter name. ASCII only, and starting with an
# alphanumeric so "." / ".." / hidden files can never be named. Used with fullmatch:
# a "$" anchor would accept a trailing newline.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# adapter or tenant/adapter: two components of 64 plus the slash.
MAX_NAME_LENGTH = 129

# Files fetched from the hub. The .bin is fetched only so the reader can refuse
# pickle-only adapters by name; nothing here or downstream ever unpickles it.
HUB_ALLOW_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Location:
    """Where an adapter's bytes come from. Tenant rules match ``identity``, never a name
    an API client chose: the served name of a load request is only a label."""

    source: "AdapterSource"
    path: Path
    """The real directory holding the adapter's files."""
    name: str
    """How the source names it: ``tenant/adapter`` under a local root, or ``hub:org/repo``."""
    identity: str
    """Where the files really are: the real path under the root (a link ``tenant/current`` ->
    ``tenant/v3`` has identity ``tenant/v3``), or ``hub:org/repo``. What tenant rules match."""
    confine: Path | None
    """Every file the reader opens must resolve inside this directory."""


def _shown(name: object, limit: int = 80) -> str:
    """A printable, bounded rendering of an untrusted name for messages and logs."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_name(name: object, why: str) -> AdapterRefused:
    return AdapterRefused(RefusalReason.INVALID_NAME, f"invalid adapter name {_shown(name)}: {why}")


def validate_adapter_name(name: object) -> None:
    """Check a *local* adapter name: ``adapter`` or ``tenant/adapter``.

    Raises ``AdapterRefused(INVALID_NAME)`` saying what is wrong. No decoding of any
    kind (URL, unicode normalisation) is performed, so encoded tricks such as
    ``%2e%2e`` are simply invalid rather than interpreted.
    """
    if not isinstance(name, str):
        raise _refuse_name(name, f"must be a string, not {type(name).__name__}")
    if not name:
        raise _refuse_name(name, "is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise _refuse_name(name, f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})")
    # The specific checks below only exist to give a precise message; the component
    # regex would reject all of these characters anyway.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _refuse_name(name, "contains control characters")
    if "\\" in name:
        raise _refuse_name(name, "contains a backslash")
    if "%" in name:
        raise _refuse_name(name, "contains '%' (names are never URL-decoded)")
    if name.startswith("/"):
        raise _refuse_name(name, "is an absolute path")
    if name.endswith("/"):
        raise _refuse_name(name, "ends with '/'")
    parts = name.split("/")
    if len(parts) > 2:
        raise _refuse_name(name, "has more than one '/' (use 'adapter' or 'tenant/adapter')")
    for part in parts:
        if not part:
            raise _refuse_name(name, "has an empty path component")
        if ".." in part:
            raise _refuse_name(name, "contains '..'")
        if not _COMPONENT_RE.fullmatch(part):
            raise _refuse_name(
                name,
                f"component {_shown(part)} must start with a letter or digit and use only "
                "A-Z a-z 0-9 . _ - (1 to 64 characters)",
            )


class AdapterSource(abc.ABC):
    """One place adapters can come from.

    ``prefix``: names starting with it belong to this source exclusively (e.g. ``hub:``);
    ``None`` for sources that take plain names. ``locate_adapter`` uses it to pick the
    sources that are meant to serve a name, so a hub name is never looked up on disk.
    """

    kind: str
    prefix: str | None = None

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

    def location_of(self, path: str) -> Location | None:
        """The location of an explicit ``lora_path`` if this source holds it, else None."""
        return None


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
            raise AdapterRefused(RefusalReason.NOT_FOUND, f"lora_path {_shown(path)} is not a directory")
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
                f"adapter name {_shown(name)} resolves outside the adapter directory",
                adapter=name,
            )
        if not os.path.exists(real):
            return None
        if not os.path.isdir(real):
            raise AdapterRefused(
                RefusalReason.NOT_FOUND,
                f"{_shown(name)} exists in the adapter directory but is not a directory "
                "(an adapter is a directory holding adapter_config.json and its weights)",
                adapter=name,
            )
        return Path(real)


class HubSource(AdapterSource):
    """Adapters on the Hugging Face hub, named ``<prefix><org>/<repo>`` (``hub:acme/my-lora``).

    Only repositories matching ``allow`` (fnmatch patterns, case-insensitive because hub
    ids are) are fetched, and only the adapter files; an empty ``allow`` admits nothing
    (deny by default, like every other trust decision). ``local_files_only=None`` follows
    ``HF_HUB_OFFLINE``; offline, the local hub cache is used and a repository that is not
    cached is simply not found.
    """

    kind = "hub"

    def __init__(
        self,
        prefix: str = "hub:",
        allow: Sequence[str] = (),
        revision: str | None = None,
        cache_dir: Path | str | None = None,
        local_files_only: bool | None = None,
        token: str | None = None,
    ):
        if not prefix:
            raise ConfigError("hub adapter source needs a non-empty name prefix such as 'hub:'")
        if isinstance(allow, str):
            # A bare string would be iterated character by character: "*" still works
            # by luck, "acme/*" would silently allow every single-character pattern.
            raise ConfigError("hub adapter source 'allow' must be a list of patterns, not a string")
        self.prefix = prefix
        self.allow = tuple(allow)
        self.revision = revision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.local_files_only = local_files_only
        self._token = token  # never logged or shown

    def describe(self) -> str:
        rev = f", revision {self.revision!r}" if self.revision else ""
        return f"Hugging Face hub (names '{self.prefix}<org>/<repo>', allowed {list(self.allow)}{rev})"

    def repo_id(self, name: str) -> str:
        """Validate a hub adapter name and return its repository id."""
        if not isinstance(name, str) or not name.startswith(self.prefix):
            raise _refuse_name(name, f"hub adapter names start with {self.prefix!r}")
        repo_id = name[len(self.prefix):]
        # huggingface_hub's validator accepts any unicode word character; we do not.
        if not repo_id.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in repo_id):
            raise _refuse_name(name, "hub repository ids are printable ASCII")
        if repo_id.count("/") != 1:
            raise _refuse_name(name, f"expected {self.prefix}<org>/<repo>")
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise _refuse_name(name, str(exc)) from None
        lowered = repo_id.lower()
        if not any(fnmatch.fnmatchcase(lowered, pat.lower()) for pat in self.allow):
            if not self.allow:
                raise _refuse_name(name, "this server's hub allow-list is empty, so no hub repository is served")
            raise _refuse_name(name, f"repository {repo_id!r} is not in the hub allow-list")
        return repo_id

    def confine_root(self) -> Path:
        from huggingface_hub import constants

        # Hub snapshots are symlinks into the hub cache's blobs/.
        return Path(self.cache_dir or constants.HF_HUB_CACHE)

    def location(self, name: str, path: Path) -> Location:
        ref = self.prefix + self.repo_id(name)
        return Location(source=self, path=Path(path), name=ref, identity=ref, confine=self.confine_root())

    def _offline(self) -> bool:
        if self.local_files_only is not None:
            return self.local_files_only
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)

    def locate(self, name: str) -> Path | None:
        repo_id = self.repo_id(name)
        import huggingface_hub
        from huggingface_hub import errors as hf_errors

        offline = self._offline()

        def refuse(why: str) -> AdapterRefused:
            return AdapterRefused(RefusalReason.NOT_FOUND, why, adapter=name)

        try:
            folder = huggingface_hub.snapshot_download(
                repo_id,
                revision=self.revision,
                allow_patterns=list(HUB_ALLOW_PATTERNS),
                cache_dir=self.cache_dir,
                local_files_only=offline,
                token=self._token,
            )
        # Order matters: several of these are subclasses of the ones below them.
        except hf_errors.IncompleteSnapshotError:
            logger.warning(
                "hub adapter %s: the cached snapshot is incomplete and the hub cannot be "
                "used (offline=%s); re-download it with network access",
                repo_id, offline,
            )
            raise refuse(f"hub repository {repo_id!r} is only partly cached and cannot be fetched now") from None
        except hf_errors.LocalEntryNotFoundError as exc:
            if exc.__cause__ is not None and not offline:
                logger.warning(
                    "hub adapter %s: the hub is unreachable and the repository is not cached (%s: %s)",
                    repo_id, type(exc.__cause__).__name__, exc.__cause__,
                )
            else:
                logger.info("hub adapter %s is not in the local hub cache (offline=%s)", repo_id, offline)
            return None
        except hf_errors.GatedRepoError:
            logger.warning("hub adapter %s is gated: configure a token with access to it", repo_id)
            raise refuse(f"hub repository {repo_id!r} is gated and this server has no access to it") from None
        except hf_errors.RepositoryNotFoundError:
            logger.info("hub adapter %s: repository not found (or private without a token)", repo_id)
            return None
        except hf_errors.RevisionNotFoundError:
            raise refuse(f"revision {self.revision!r} does not exist in hub repository {repo_id!r}") from None
        except hf_errors.HFValidationError as exc:
            # Repo id was validated above, so this is the configured revision.
            raise refuse(f"hub repository {repo_id!r} cannot be fetched: {exc}") from None
        except (hf_errors.HfHubHTTPError, OSError) as exc:
            logger.warning(
                "hub adapter %s could not be fetched: %s: %s", repo_id, type(exc).__name__, exc
            )
            raise refuse(
                f"hub repository {repo_id!r} could not be fetched ({type(exc).__name__}); try again later"
            ) from None
        return Path(folder)


def locate(sources: Sequence[AdapterSource], name: str) -> Location:
    """:func:`locate_adapter` as a :class:`Location`."""
    source, path = locate_adapter(sources, name)
    return source.location(name, path)


def locate_path(sources: Sequence[AdapterSource], lora_path: str) -> Location:
    """The location of an explicit ``lora_path`` (load endpoint, ``--lora-modules``, offline
    requests): a directory under a local root, or an allowed hub repository id."""
    try:
        candidate = Path(lora_path).expanduser()
        local = candidate.is_absolute() or candidate.exists()
    except (OSError, ValueError) as exc:  # e.g. ENAMETOOLONG: the client's path, a 4xx
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path {_shown(lora_path)} cannot be used ({getattr(exc, 'strerror', None) or exc})",
        ) from None
    if local:
        for source in sources:
            found = source.location_of(str(candidate))
            if found is not None:
                return found
        roots = [str(s.root) for s in sources if isinstance(s, LocalDirSource)]
        raise AdapterRefused(
            RefusalReason.INVALID_NAME,
            f"lora_path {_shown(lora_path)} is outside the configured adapter_dirs; only adapters under {roots} can be loaded",
        )
    hub = next((s for s in sources if isinstance(s, HubSource)), None)
    if hub is not None:
        ref = lora_path if lora_path.startswith(hub.prefix) else hub.prefix + lora_path
        path = hub.locate(ref)
        if path is not None:
            return hub.location(ref, path)
    raise AdapterRefused(
        RefusalReason.NOT_FOUND,
        f"lora_path {_shown(lora_path)} is not a local directory"
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
