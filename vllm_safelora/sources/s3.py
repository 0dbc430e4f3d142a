"""Adapters in S3-compatible object storage, named ``s3:<tenant>/<adapter>``.

``s3:acme/support-bot`` reads ``<uri>acme/support-bot/adapter_config.json`` and
``.../adapter_model.safetensors`` and nothing else: a ``.bin``-only adapter is refused by its
name (one HEAD), never downloaded. What a fetch guarantees:

* the name is checked by the local rules (one tenant level, no ``..``, ``%`` or control
  characters) before any request leaves the process;
* sizes are bounded before the download (the HEAD's advertised size: a huge object costs a
  HEAD) and during it (a streamed byte cap, exactly the advertised size);
* both files come from one pinned version: each GET is pinned to the ETag (or version id) its
  HEAD saw, and both are HEAD-ed again afterwards; an object rewritten meanwhile makes the
  whole fetch start over (``retries`` times), then the adapter is refused, never served mixed;
* the bytes land in a private directory (mode 0700) that only this process writes, and the
  reader hashes exactly the bytes it parses from there; the directory is deleted once read;
* the download runs inside the service's preparation slot (:meth:`S3Source.open`), on the plugin's threads, under
  connect/read timeouts and a wall-clock deadline: a store that is down or slow gives that
  tenant a 503 with Retry-After (:class:`SourceUnavailable`), never a 500, never a stall for
  tenants whose adapters are prepared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator

from .. import metrics
from ..adapters import ReadLimits
from ..adapters.directory import AdapterDirectory, PathDirectory
from ..adapters.names import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE
from ..errors import AdapterRefused, ConfigError, RefusalReason, SourceUnavailable
from ..objectstore import ObjectHead, ObjectStore, StoreRefused, StoreTimeouts, StoreUnavailable, parse_s3_uri
from .base import AdapterSource, Location
from .names import namespace_of, refuse_name, validate_adapter_name

logger = logging.getLogger(__name__)

STAGING_PREFIX = "safelora-s3."  # + "<pid>." + random: a dead pid's leftovers are removed at start-up

_REFUSAL = {
    "not_found": RefusalReason.NOT_FOUND,
    "access_denied": RefusalReason.NOT_FOUND,
    "changed": RefusalReason.CHANGED_WHILE_READING,
    "too_large": RefusalReason.TOO_LARGE,
}


def _count_failure(reason: str) -> None:
    metrics.SOURCE_FETCH_FAILURES.labels(source="s3", reason=reason).inc()


class S3Source(AdapterSource):
    kind = "s3"
    remote = True

    def __init__(
        self,
        uri: str | None,
        prefix: str = "s3:",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        timeouts: StoreTimeouts = StoreTimeouts(),
        retry_after_s: float = 5.0,
        staging_dir: Path | str | None = None,
        limits: ReadLimits = ReadLimits(),
    ):
        if not prefix:
            raise ConfigError("the s3 adapter source needs a non-empty name prefix such as 's3:'")
        if uri is None:
            raise ConfigError("s3 is enabled but s3.uri is not set (e.g. s3://adapters/tenants/)")
        self.prefix = prefix
        self.store = ObjectStore(
            parse_s3_uri(uri, "s3.uri"),
            endpoint_url=endpoint_url,
            region=region,
            timeouts=timeouts,
            what="s3",
        )
        self.retries = timeouts.retries
        # The served vLLM's read limits (the reader checks them again): what the HEAD's advertised
        # sizes and the streamed caps are held to.
        self.limits = limits
        self.retry_after_s = retry_after_s
        self.staging = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())
        if not self.staging.is_dir() or not os.access(self.staging, os.W_OK | os.X_OK):
            raise ConfigError(f"s3.staging_dir {str(self.staging)!r} is not a writable directory")
        self._remove_stale_downloads()

    def describe(self) -> str:
        return f"object storage {self.store.describe()} (names '{self.prefix}<tenant>/<adapter>')"

    # ------------------------------------------------------------------ names

    def adapter_path(self, name: object) -> str:
        """``tenant/adapter`` of a valid ``<prefix>tenant/adapter`` name; refused before any request."""
        if not isinstance(name, str) or not name.startswith(self.prefix):
            raise refuse_name(name, f"object storage adapter names start with {self.prefix!r}")
        rest = name[len(self.prefix) :]
        validate_adapter_name(rest)
        if rest.count("/") != 1:
            raise refuse_name(name, f"expected {self.prefix}<tenant>/<adapter> (exactly one tenant level)")
        return rest

    def location(self, name: str, path: Path) -> Location:
        ref = self.prefix + self.adapter_path(name)
        # Nothing of an object store is on disk until fetched(); the reader is pointed at the
        # private download directory, so no confinement root applies.
        return Location(source=self, path=Path(path), name=ref, identity=ref, confine=None, namespace=namespace_of(ref))

    def locate(self, name: str) -> Path:
        # Only the name is checked here: the store is asked inside the preparation slot
        # (open), where a missing adapter is refused as not found.
        return Path(self.store.key(self.adapter_path(name)))

    def location_of(self, path: str) -> Location | None:
        """``s3:tenant/adapter`` or the full ``s3://bucket/prefix/tenant/adapter`` as a lora_path."""
        base = str(self.store.uri)
        if isinstance(path, str) and path.startswith(base):
            name = self.prefix + path[len(base) :].rstrip("/")
        elif self.claims(path) and not path.startswith("s3://"):
            name = path
        else:
            return None
        return self.location(name, self.locate(name))

    # ------------------------------------------------------------------ fetching

    def _remove_stale_downloads(self) -> None:
        from ..cache.layout import pid_alive

        with contextlib.suppress(OSError):
            for entry in os.scandir(self.staging):
                if not entry.name.startswith(STAGING_PREFIX):
                    continue
                pid = entry.name[len(STAGING_PREFIX) :].partition(".")[0]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    shutil.rmtree(entry.path, ignore_errors=True)

    @contextlib.contextmanager
    def open(self, location: Location) -> Iterator[AdapterDirectory]:
        """Download the two files into a private directory (mode 0700, written by this process only)
        and read them from there by path; the service opens a location inside its preparation slot."""
        rest = self.adapter_path(location.name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=self.staging))
        try:
            self._download(location.name, rest, tmp, self.limits)
            yield PathDirectory(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _head_or_none(self, key: str) -> ObjectHead | None:
        try:
            return self.store.head(key)
        except StoreRefused as exc:
            if exc.reason == "not_found":
                return None
            raise

    def _heads(self, name: str, rest: str, limits) -> dict[str, ObjectHead]:
        """The two objects' advertised sizes and versions; refusals for what must not be downloaded."""
        where = f"{self.store.uri}{rest}/"
        config = self._head_or_none(self.store.key(f"{rest}/{CONFIG_FILE}"))
        if config is None:
            raise StoreRefused("not_found", f"no {CONFIG_FILE} at {where}")
        weights = self._head_or_none(self.store.key(f"{rest}/{WEIGHTS_FILE}"))
        if weights is None:
            pickles = [p for p in PICKLE_FILES if self._head_or_none(self.store.key(f"{rest}/{p}")) is not None]
            if pickles:
                _count_failure("pickle_only")
                raise AdapterRefused(
                    RefusalReason.PICKLE_ONLY,
                    f"only pickle weights ({', '.join(pickles)}) are at {where}; pickle is never downloaded or loaded "
                    "here. Re-save the adapter with save_pretrained(..., safe_serialization=True)",
                    name,
                )
            _count_failure("missing_weights")
            raise AdapterRefused(RefusalReason.MISSING_TENSOR, f"{WEIGHTS_FILE} is missing at {where}", name)
        for head, limit in ((config, limits.max_config_bytes), (weights, limits.max_bytes)):
            if head.size > limit:
                raise StoreRefused(
                    "too_large",
                    f"{head.key.rpartition('/')[2]} is {head.size} bytes in the store, the limit is {limit}",
                )
        return {CONFIG_FILE: config, WEIGHTS_FILE: weights}

    def _download(self, name: str, rest: str, tmp: Path, limits) -> None:
        start = time.monotonic()
        deadline = start + self.store.timeouts.total_s
        try:
            for attempt in range(1 + self.retries):
                try:
                    heads = self._heads(name, rest, limits)
                    for fname, head in heads.items():
                        cap = limits.max_config_bytes if fname == CONFIG_FILE else limits.max_bytes
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp / fname)  # a previous attempt's
                        with open(tmp / fname, "xb") as out:
                            try:
                                self.store.get_capped(head, out, cap, deadline)
                            finally:
                                metrics.SOURCE_FETCH_BYTES.labels(source="s3").inc(out.tell())
                    for head in heads.values():
                        now = self.store.head(head.key)
                        if (now.etag, now.version_id) != (head.etag, head.version_id):
                            raise StoreRefused("changed", f"{head.key} was rewritten while the adapter was fetched")
                    break
                except StoreRefused as exc:
                    if exc.reason != "changed" or attempt == self.retries:
                        raise
                    logger.info(
                        "safelora: s3 adapter %s changed while fetched (%s); fetching it again", name, exc.detail
                    )
        except StoreRefused as exc:
            _count_failure(exc.reason)
            if exc.reason == "access_denied":
                logger.warning(
                    "safelora: s3 adapter %s: %s; check that this server's credentials allow s3:GetObject (and "
                    "s3:ListBucket, or a missing object looks like a denied one) on %s",
                    name,
                    exc.detail,
                    self.store.uri,
                )
            detail = exc.detail
            if exc.reason == "changed":
                detail += f" on each of {1 + self.retries} attempts; upload it once and ask again"
            raise AdapterRefused(_REFUSAL[exc.reason], detail, name) from None
        except StoreUnavailable as exc:
            _count_failure(exc.reason)
            logger.warning("safelora: s3 adapter %s not fetched from %s: %s", name, self.store.describe(), exc)
            raise SourceUnavailable(exc.detail, self.retry_after_s, exc.reason) from None
        metrics.SOURCE_FETCH_SECONDS.labels(source="s3").observe(time.monotonic() - start)
