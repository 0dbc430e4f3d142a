"""Prepare one adapter: read it, apply its tenant's policy, cache the result, count it.

Given where the upload is (a :class:`~vllm_safelora.sources.Location`, found by the
caller), the preparer checks the refusal memory, takes a slot of the preparation
throttle, reads and validates the files, applies the tenant's policy inside the
cache's single-flight build and returns the verified entry. It remembers nothing
about what vLLM was handed (:mod:`.registry` does). Holds no math, imports no vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from .. import metrics
from ..adapters import (
    AdapterFiles,
    ReadLimits,
    file_identity,
    parse_adapter,
    read_adapter_files,
    write_adapter_files,
)
from ..apply_policy import project_for_tenant
from ..bank import AlignmentBank
from ..cache import CacheKey, PatchedAdapterCache, entry_signature, signature_racy
from ..cache.shared_tier import SharedTier
from ..config import SafeLoRASettings
from ..errors import AdapterRefused, CacheUnavailable, Overloaded, SourceUnavailable
from ..fsutil import fast_hash
from ..policies.tenant_rules import TenantPolicy, resolve_tenant
from ..report import REPORT_FILE, AdapterReport
from ..sources import LocalDirSource, Location
from .refusal_memory import RefusalCache
from .throttle import PreparationThrottle

logger = logging.getLogger("vllm_safelora")


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter ready for vLLM: ``path`` is a verified, patched cache entry."""

    name: str
    path: Path
    digest: str
    report: AdapterReport
    cache_hit: bool
    location: Location | None = None
    """Where the uploaded adapter was read from: an entry that vanishes or changes is rebuilt from it."""
    signature: tuple = ()
    """The entry's identity (directory and files, with ctime) when it was verified."""
    signed_at_ns: int = 0
    """When ``signature`` was taken: one taken within a timestamp tick of a write proves nothing."""

    def unchanged_on_disk(self) -> bool:
        """Cheap per-request check (a stat per file) that the verified entry is still as verified.

        Any write or touch by a non-root process moves a file's ctime; a signature taken in the
        same tick as the entry was written is re-verified (hashed) instead of trusted."""
        return (
            bool(self.signature)
            and not signature_racy(self.signature, self.signed_at_ns)
            and entry_signature(self.path) == self.signature
        )


def _origin(location: Location) -> str:
    """How to find an upload again (recorded in the cache index): a local path or a hub name."""
    return str(location.path) if isinstance(location.source, LocalDirSource) else location.name


class AdapterPreparer:
    def __init__(
        self,
        settings: SafeLoRASettings,
        bank: AlignmentBank,
        cache: PatchedAdapterCache,
        limits: ReadLimits,
        shared: SharedTier | None = None,
    ):
        self.settings = settings
        self.bank = bank
        self.cache = cache
        self.limits = limits
        self.shared = shared
        self.throttle = PreparationThrottle(settings.max_concurrent_preparations, settings.max_queued_preparations)
        self.refusals = RefusalCache(settings.refusal_cache_entries)
        self._unavailable_until = 0.0

    def retry_after_s(self) -> float:
        """What a 503 tells clients to wait: the cache's retry while a storage fault was seen recently,
        else the throttle's."""
        left = self._unavailable_until - time.monotonic()
        return max(self.throttle.retry_after_s, left if left > 0 else 0.0)

    def prepare(self, name: str, find_location: Callable[[], Location], where: str) -> PreparedAdapter:
        """Prepare the adapter ``find_location()`` names (its refusals counted like the adapter's own).

        Raises AdapterRefused (already counted in the metrics and logged) or Overloaded.
        """
        start = time.perf_counter()
        tenant: TenantPolicy | None = None
        try:
            location = find_location()
            tenant = resolve_tenant(self.settings, location.identity)
            with self.throttle.slot(name, where):
                prepared = self._prepare_location(name, location, tenant)
        except AdapterRefused as exc:
            exc.for_adapter(name)
            policy = (tenant.policy if tenant is not None else self.settings.policy).kind
            metrics.ADAPTERS.labels(outcome="refused", policy=policy, mode="enforce").inc()
            metrics.count_refusal(exc.reason.value)
            logger.warning("safelora: %s", exc)
            raise
        except CacheUnavailable as exc:
            # The operator's fault, not the adapter's: counted, never remembered as a refusal.
            metrics.ADAPTERS.labels(outcome="unavailable", policy=self.settings.policy.kind, mode="enforce").inc()
            metrics.CACHE_UNAVAILABLE.labels(fault=exc.fault).inc()
            self._unavailable_until = time.monotonic() + exc.retry_after_s
            logger.warning("safelora: adapter '%s' (%s) not prepared: %s", name, where, exc)
            raise
        except SourceUnavailable as exc:
            # The store's fault, not the adapter's: never remembered as a refusal; clients are told
            # the store's Retry-After while it keeps failing.
            metrics.ADAPTERS.labels(outcome="unavailable", policy=self.settings.policy.kind, mode="enforce").inc()
            self._unavailable_until = max(self._unavailable_until, time.monotonic() + exc.retry_after_s)
            logger.warning("safelora: adapter '%s' (%s) not prepared: %s", name, where, exc)
            raise
        except Overloaded as exc:
            logger.warning("safelora: adapter '%s' (%s) not prepared: %s", name, where, exc)
            raise
        except Exception:
            # Server-side trouble (a cache lock timeout, a bug; a full cache is CacheUnavailable): the client
            # gets a 5xx, nothing is served, and the operator gets the traceback.
            metrics.ADAPTERS.labels(outcome="error", policy=self.settings.policy.kind, mode="enforce").inc()
            logger.exception(
                "safelora: preparing adapter '%s' failed on the server side; it was not served. Check the cache "
                "directory %s (space, permissions) and the traceback below",
                name,
                self.settings.cache_dir,
            )
            raise
        summary = prepared.report.summary
        metrics.CACHE_REQUESTS.labels(result="hit" if prepared.cache_hit else "miss").inc()
        logger.info(
            "safelora: adapter '%s' from %s %s%s: %d/%d modules projected (min cosine %s, mean Pdst %.4f), policy %s "
            "%s (rule '%s'), bank %s -> cache entry %s [%s, %.3fs]",
            name,
            location.identity,
            summary.outcome,
            " (SHADOW: served unprojected)" if tenant.shadow else "",
            summary.projected,
            summary.modules,
            f"{summary.min_cosine:.5f}" if summary.min_cosine is not None else "n/a",
            summary.mean_pdst,
            summary.policy_name,
            summary.policy_id,
            tenant.rule,
            summary.bank_id,
            prepared.digest[:16],
            "cache hit" if prepared.cache_hit else "projected now",
            time.perf_counter() - start,
        )
        return prepared

    def _prepare_location(self, name: str, location: Location, tenant: TenantPolicy) -> PreparedAdapter:
        decided_by = (tenant.cache_policy_id(self.bank), tenant.admission.model_dump_json())
        # Opened once: the files' identity and their bytes both come from this descriptor.
        with location.open() as directory:
            identity = file_identity(directory, name)
            files_key = None if identity is None else (*identity, decided_by)
            if files_key is not None and (refused := self.refusals.by_files(files_key)) is not None:
                metrics.REFUSAL_CACHE_HITS.inc()
                raise refused
            if (known := self._known_upload(name, identity, location, tenant)) is not None:
                return known
            try:
                files = read_adapter_files(directory, name=name, limits=self.limits)
            except AdapterRefused as exc:  # e.g. over the size limits: refused before its content is known
                self.refusals.remember(exc, None, files_key)
                raise
        content_key = (files.content_hash, decided_by)
        if (refused := self.refusals.by_content(content_key)) is not None:
            metrics.REFUSAL_CACHE_HITS.inc()
            self.refusals.remember(refused, content_key, files_key)
            raise refused
        try:
            prepared = self._prepare_files(name, files, location, tenant)
        except AdapterRefused as exc:
            self.refusals.remember(exc, content_key, files_key)
            raise
        self._remember_upload(files)
        return prepared

    # ------------------------------------------------------------------ uploads known by identity

    def _upload_key(self, identity: tuple) -> str:
        """The index key of an upload: its files' identity, and the limits and vLLM rules it passed."""
        text = repr((self.limits.fingerprint(), [dataclasses.astuple(i) for i in identity]))
        return fast_hash(text.encode())

    def _known_upload(
        self, name: str, identity: tuple | None, location: Location, tenant: TenantPolicy
    ) -> PreparedAdapter | None:
        """An upload this cache already read, unchanged since (the identity rule): its entry, without
        reading or parsing the upload again. None where it must be read."""
        if identity is None or not self.cache.verified.trusted:
            return None
        try:
            content_hash = self.cache.index.upload_hash(self._upload_key(identity))
        except Exception as exc:  # a read of the index that fails only costs the fast path
            logger.debug("safelora: upload index lookup failed: %s", exc)
            return None
        if content_hash is None:
            return None
        key = CacheKey(
            adapter_hash=content_hash, bank_id=self.bank.bank_id, policy_id=tenant.cache_policy_id(self.bank)
        )
        entry = self.cache.get_leased(key, origin=_origin(location))
        if entry is None:
            return None
        metrics.UPLOADS_KNOWN_BY_IDENTITY.inc()
        return self._prepared(name, entry, True, location)

    def _remember_upload(self, files: AdapterFiles) -> None:
        identity = files.identity
        if identity is None or not self.cache.verified.trusted:
            return
        if any(i.racy(files.read_at_ns) for i in identity):
            return  # written in the tick it was read: read it again next time
        try:
            self.cache.index.remember_upload(self._upload_key(identity), files.content_hash)
        except Exception as exc:  # best-effort: a full disk only costs the fast path
            logger.debug("safelora: could not record upload %s by identity: %s", files.name, exc)

    def _prepare_files(
        self, name: str, files: AdapterFiles, location: Location, tenant: TenantPolicy
    ) -> PreparedAdapter:
        adapter = parse_adapter(files, limits=self.limits)
        key = CacheKey(
            adapter_hash=adapter.content_hash, bank_id=self.bank.bank_id, policy_id=tenant.cache_policy_id(self.bank)
        )

        from_tier = False

        def build(tmpdir: Path) -> dict[str, str]:
            nonlocal from_tier
            # Another replica's signed entry for this exact key, instead of projecting it again
            # (the upload was read and validated here all the same).
            if self.shared is not None and (fetched := self.shared.fetch_into(key, tmpdir)) is not None:
                from_tier = True
                return fetched
            start = time.perf_counter()
            outcome = project_for_tenant(
                adapter,
                self.bank,
                tenant,
                name=name,
                aliases=self.settings.aliases,
                require_base_model_match=self.settings.require_base_model_match,
            )
            written = write_adapter_files(tmpdir, outcome.adapter)
            self._observe_projection(outcome.report, tenant, time.perf_counter() - start)
            return written  # hashed from memory: the seal does not read the files back

        # Leased before it is verified (no eviction can slip in); the lease passes to the
        # registry of paths handed to vLLM, and is given back when the adapter drops out.
        # An entry exists only for an adapter its tenant's rules admitted (they are part
        # of the key), so a hit and a fresh build are read the same way.
        entry, hit = self.cache.get_or_create(key, build, lease=True, origin=_origin(location))
        if self.shared is not None and not hit and not from_tier:
            self.shared.publish(entry)
        return self._prepared(name, entry, hit, location)

    def _prepared(self, name: str, entry, hit: bool, location: Location) -> PreparedAdapter:
        """``entry`` (leased by the caller) as handed to vLLM; the lease is given back if its report cannot be read."""
        try:
            report = AdapterReport.model_validate_json((entry.path / REPORT_FILE).read_bytes())
        except BaseException:
            self.cache.release(entry.digest)
            raise
        metrics.CACHE_BYTES.set(self.cache.total_bytes())  # from the index: one row read
        signed_at = time.time_ns()
        return PreparedAdapter(
            name=name,
            path=entry.path,
            digest=entry.digest,
            report=report,
            cache_hit=hit,
            location=location,
            signature=entry_signature(entry.path),
            signed_at_ns=signed_at,
        )

    def _observe_projection(self, report: AdapterReport, tenant: TenantPolicy, seconds: float) -> None:
        metrics.PROJECTIONS.labels(policy=tenant.policy.kind).inc()
        metrics.PROJECTION_SECONDS.observe(seconds)
        metrics.MODULES_PROJECTED.inc(report.summary.projected)
        if report.summary.mean_cosine is not None:
            metrics.ADAPTER_MEAN_COSINE.observe(report.summary.mean_cosine)
        for module in report.modules:
            metrics.MODULE_COSINE.observe(module.cosine)
