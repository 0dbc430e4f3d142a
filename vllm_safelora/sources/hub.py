"""Adapters on the Hugging Face hub, named ``hub:<org>/<repo>``, fetched only from an allow-list."""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from collections.abc import Sequence

from ..errors import AdapterRefused, ConfigError, RefusalReason
from .base import AdapterSource, Location
from .names import namespace_of, refuse_name

logger = logging.getLogger(__name__)

# Files fetched from the hub. The .bin is fetched only so the reader can refuse
# pickle-only adapters by name; nothing here or downstream ever unpickles it.
HUB_ALLOW_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


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
            raise refuse_name(name, f"hub adapter names start with {self.prefix!r}")
        repo_id = name[len(self.prefix) :]
        # huggingface_hub's validator accepts any unicode word character; we do not.
        if not repo_id.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in repo_id):
            raise refuse_name(name, "hub repository ids are printable ASCII")
        if repo_id.count("/") != 1:
            raise refuse_name(name, f"expected {self.prefix}<org>/<repo>")
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise refuse_name(name, str(exc)) from None
        lowered = repo_id.lower()
        if not any(fnmatch.fnmatchcase(lowered, pat.lower()) for pat in self.allow):
            if not self.allow:
                raise refuse_name(name, "this server's hub allow-list is empty, so no hub repository is served")
            raise refuse_name(name, f"repository {repo_id!r} is not in the hub allow-list")
        return repo_id

    def confine_root(self) -> Path:
        from huggingface_hub import constants

        # Hub snapshots are symlinks into the hub cache's blobs/.
        return Path(self.cache_dir or constants.HF_HUB_CACHE)

    def location(self, name: str, path: Path) -> Location:
        ref = self.prefix + self.repo_id(name)
        return Location(
            source=self,
            path=Path(path),
            name=ref,
            identity=ref,
            confine=self.confine_root(),
            namespace=namespace_of(ref),
        )

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
                repo_id,
                offline,
            )
            raise refuse(f"hub repository {repo_id!r} is only partly cached and cannot be fetched now") from None
        except hf_errors.LocalEntryNotFoundError as exc:
            if exc.__cause__ is not None and not offline:
                logger.warning(
                    "hub adapter %s: the hub is unreachable and the repository is not cached (%s: %s)",
                    repo_id,
                    type(exc.__cause__).__name__,
                    exc.__cause__,
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
            logger.warning("hub adapter %s could not be fetched: %s: %s", repo_id, type(exc).__name__, exc)
            raise refuse(
                f"hub repository {repo_id!r} could not be fetched ({type(exc).__name__}); try again later"
            ) from None
        return Path(folder)
