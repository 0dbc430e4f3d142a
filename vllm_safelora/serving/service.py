"""One pipeline for every entry point: locate -> read/validate -> project -> cache -> verified path.

The vLLM integration calls :meth:`SafeLoRAService.prepare` for every adapter it
sees (resolver, load endpoint, static modules, offline requests) and hands vLLM
only the cache entry directory it returns. This module holds no math and
imports no vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import metrics
from ..adapters import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, ReadLimits, parse_adapter, read_adapter_files, write_adapter_files,
)
from ..bank import AlignmentBank
from ..cache import CacheKey, PatchedAdapterCache, entry_path_in, entry_signature
from .client_input import MAX_LORA_PATH, check_lora_path, check_served_name
from ..config import SafeLoRASettings
from ..apply_policy import project_for_tenant
from ..errors import AdapterRefused, Overloaded, RefusalReason
from .refusal_memory import RefusalCache
from ..report import REPORT_FILE, AdapterReport
from ..sources import AdapterSource, LocalDirSource, Location, locate, locate_path, shown_name
from .startup import announce_start, build_sources, load_checked_bank
from ..policies.tenant_rules import TenantPolicy, resolve_tenant
from .throttle import PreparationThrottle
from .tracking import LeasedLRU

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
    """(name, size, mtime_ns, inode) of the entry's files when they were verified."""

    def unchanged_on_disk(self) -> bool:
        """Cheap per-request check (a stat per file) that the verified entry is still as verified."""
        return bool(self.signature) and entry_signature(self.path) == self.signature


def _files_identity(path: Path, decided_by: tuple) -> tuple | None:
    """What identifies an adapter's unchanged files without reading them (None if they cannot be stat'ed)."""
    try:
        stats = [os.stat(path / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    return (*((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in stats), decided_by)


def _origin(location: Location) -> str:
    """How to find an upload again (recorded in the cache index): a local path or a hub name."""
    return str(location.path) if isinstance(location.source, LocalDirSource) else location.name


class SafeLoRAService:
    def __init__(
        self,
        settings: SafeLoRASettings,
        bank: AlignmentBank,
        sources: Sequence[AdapterSource],
        cache: PatchedAdapterCache,
        *,
        max_rank: int | None = None,
        limits: ReadLimits | None = None,
    ):
        self.settings = settings
        self.bank = bank
        self.sources = list(sources)
        self.cache = cache
        # The integration passes limits that follow the served vLLM (its dtype, rank and
        # name rules); without them (tests, offline use) only size and rank are bounded.
        self.limits = limits or ReadLimits(max_bytes=settings.max_adapter_bytes, max_rank=max_rank)
        self.throttle = PreparationThrottle(settings.max_concurrent_preparations, settings.max_queued_preparations)
        self.refusals = RefusalCache(settings.refusal_cache_entries)
        self._lock = threading.Lock()
        # Entry paths handed to vLLM, and names listed as loaded: LRU maps of at most
        # max_tracked_adapters each, every value holding a lease on its cache entry, so
        # neither memory, leases nor pinned cache bytes grow with the adapters ever served.
        self._by_path: LeasedLRU[PreparedAdapter] = LeasedLRU(settings.max_tracked_adapters, cache)
        self._by_name: LeasedLRU[PreparedAdapter] = LeasedLRU(settings.max_tracked_adapters, cache)
        # Names that dropped out of the listing while vLLM may still hold them (at most
        # max_tracked_adapters): the integration may unload them from vLLM.
        self._dropped_names: deque[str] = deque(maxlen=settings.max_tracked_adapters)

    @classmethod
    def start(
        cls, settings: SafeLoRASettings, served_model: str, *, max_rank: int | None = None,
        limits: ReadLimits | None = None,
    ) -> "SafeLoRAService":
        """Load the bank, check it protects ``served_model``, open sources and cache; fail closed."""
        bank = load_checked_bank(settings, served_model)
        cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes, verify=settings.verify_cache)
        service = cls(settings, bank, build_sources(settings), cache, max_rank=max_rank, limits=limits)
        announce_start(settings, served_model, bank, service.sources, cache)
        return service

    # ------------------------------------------------------------------ lookups

    def verified(self, lora_path: str) -> PreparedAdapter | None:
        """Is this path a cache entry this process prepared, unchanged since? (a few stats, no hashing)"""
        prepared = self._by_path.get(lora_path)
        if prepared is not None and not prepared.unchanged_on_disk():
            logger.warning(
                "safelora: cache entry %s of adapter '%s' changed or vanished on disk since it was verified; "
                "re-verifying and rebuilding it from the uploaded adapter",
                prepared.digest[:16], prepared.name,
            )
            return None
        return prepared

    def loaded(self) -> dict[str, PreparedAdapter]:
        return self._by_name.snapshot()

    def tracking(self) -> dict[str, int]:
        """Sizes of what this server tracks (all bounded): for the status page, tests and benchmarks."""
        return {
            "paths": len(self._by_path), "names": len(self._by_name), "leases": sum(self.cache.leases.held().values()),
            "max_tracked_adapters": self.settings.max_tracked_adapters,
        }

    def drain_dropped_names(self) -> list[str]:
        """Names dropped from the loaded listing (LRU) since the last call: vLLM still serves them
        from its own table until they are unloaded there (``/v1/unload_lora_adapter``)."""
        out = []
        while self._dropped_names:
            out.append(self._dropped_names.popleft())
        return out

    # ------------------------------------------------------------------ pipeline

    def forget(self, name: str) -> None:
        """The server unloaded ``name``: drop it from the audit listing and give back its lease.

        The entry stays leased while its path is still tracked (a request in flight may
        still make vLLM's worker read it); after that it may be evicted, and it is rebuilt
        if the adapter is asked for again.
        """
        self._by_name.pop(name)

    def mark_loaded(self, name: str, prepared: PreparedAdapter) -> None:
        """vLLM accepted ``prepared`` under ``name``: list it in the audit API and count the load.

        Called by the integration only after the engine's own checks passed, so a
        load vLLM refuses is never listed or counted.
        """
        if prepared.name != name:
            prepared = dataclasses.replace(prepared, name=name)
        same, dropped = self._by_name.put(name, prepared)
        self._dropped_names.extend(old for old, _ in dropped)
        if same is None or same.digest != prepared.digest:
            summary = prepared.report.summary
            metrics.ADAPTERS.labels(outcome=summary.outcome, policy=summary.policy_name, mode=summary.mode).inc()

    def ensure(self, name: str, lora_path: str, where: str = "request") -> tuple[PreparedAdapter, bool]:
        """The verified entry for a request's adapter, rebuilding it if it changed on disk.

        Returns ``(prepared, rebuilt)``: ``rebuilt`` means the path had been handed to vLLM
        before and its entry was rebuilt, so the engine must drop what it holds for it.
        """
        known = self.verified(lora_path)
        if known is not None:
            return known, False
        handed_out = lora_path in self._by_path
        prepared = self.prepare(name, lora_path, where=where)
        if not handed_out and self._entry_path(lora_path) is not None:
            # An entry path this server handed out but no longer tracks: what the engine
            # read from it is stale only if the entry had to be rebuilt or moved.
            handed_out = not prepared.cache_hit or str(prepared.path) != lora_path
        return prepared, handed_out

    def prepare(
        self, name: str, lora_path: str | None = None, *, trust_cache_paths: bool = True, where: str = "resolver"
    ) -> PreparedAdapter:
        """Locate, validate, project (or take from cache) and admit one adapter.

        ``lora_path`` is what a caller supplied (load endpoint, static module,
        offline request); ``None`` means resolve ``name`` through the sources.
        ``trust_cache_paths=False`` (paths typed by API clients) treats a cache
        entry path like any other path: it must lie under adapter_dirs, so one
        tenant cannot load another's projected adapter by its entry path.
        Raises AdapterRefused (already counted in the metrics) or Overloaded.
        """
        previous = None
        if lora_path is not None and trust_cache_paths:
            known = self.verified(lora_path)
            if known is not None:
                return known if known.name == name else dataclasses.replace(known, name=name)
            previous = self._by_path.get(lora_path)
        start = time.perf_counter()
        tenant: TenantPolicy | None = None
        try:
            check_served_name(name)
            if lora_path is not None:
                check_lora_path(lora_path)
            if previous is not None and previous.location is not None:
                # A cache path handed out earlier whose entry vanished or was altered:
                # rebuild it from the adapter it came from.
                location = previous.location
            elif trust_cache_paths and (untracked := self._untracked_entry_location(name, lora_path)) is not None:
                location = untracked
            else:
                location = self._locate(name, lora_path)
                self._check_served_as(name, location, by_path=lora_path is not None)
            tenant = resolve_tenant(self.settings, location.identity)
            with self.throttle.slot(name, where):
                prepared = self._prepare_location(name, location, tenant)
        except AdapterRefused as exc:
            exc.for_adapter(name)
            policy = (tenant.policy if tenant is not None else self.settings.policy).kind
            metrics.ADAPTERS.labels(outcome="rejected", policy=policy, mode="enforce").inc()
            metrics.REJECTIONS.labels(reason=exc.reason.value).inc()
            logger.warning("safelora: %s", exc)
            raise
        except Overloaded as exc:
            logger.warning("safelora: adapter '%s' (%s) not prepared: %s", name, where, exc)
            raise
        except Exception:
            # Server-side trouble (disk full, cache lock timeout, a bug): the client
            # gets a 5xx, nothing is served, and the operator gets the traceback.
            metrics.ADAPTERS.labels(outcome="error", policy=self.settings.policy.kind, mode="enforce").inc()
            logger.exception(
                "safelora: preparing adapter '%s' failed on the server side; it was not served. Check the cache "
                "directory %s (space, permissions) and the traceback below", name, self.settings.cache_dir,
            )
            raise
        summary = prepared.report.summary
        metrics.CACHE_REQUESTS.labels(result="hit" if prepared.cache_hit else "miss").inc()
        logger.info(
            "safelora: adapter '%s' from %s %s%s: %d/%d modules projected (min cosine %s, mean Pdst %.4f), policy %s "
            "%s (rule '%s'), bank %s -> cache entry %s [%s, %.3fs]",
            name, location.identity, summary.outcome, " (SHADOW: served unprojected)" if tenant.shadow else "",
            summary.projected, summary.modules,
            f"{summary.min_cosine:.5f}" if summary.min_cosine is not None else "n/a", summary.mean_pdst,
            summary.policy_name, summary.policy_id, tenant.rule, summary.bank_id, prepared.digest[:16],
            "cache hit" if prepared.cache_hit else "projected now", time.perf_counter() - start,
        )
        # The lease get_or_create took passes to the map of tracked paths.
        self._by_path.put(str(prepared.path), prepared, leased=True)
        return prepared

    def _entry_path(self, lora_path: str | None) -> Path | None:
        """``lora_path`` resolved if it names an entry directory of this server's cache."""
        if (
            not isinstance(lora_path, str) or not lora_path.isprintable() or not os.path.isabs(lora_path)
            or len(lora_path) > MAX_LORA_PATH
        ):
            return None
        return entry_path_in(lora_path, self.cache.entries_dir)

    def _untracked_entry_location(self, name: str, lora_path: str | None) -> Location | None:
        """Where to prepare again an entry path vLLM still holds but this server no longer
        tracks (it dropped out of the bounded map): the served name's location (names equal
        locations under served_names: location), else the upload the index recorded for the
        entry. Either is checked against the configured sources again; None if not an entry path."""
        entry = self._entry_path(lora_path)
        if entry is None:
            return None
        if self.settings.served_names == "location":
            with contextlib.suppress(AdapterRefused):
                return locate(self.sources, name)
        origin = self.cache.index.origin(entry.name)
        if origin is None:
            raise AdapterRefused(
                RefusalReason.NOT_FOUND,
                f"this server no longer tracks cache entry {entry.name[:16]} and the cache index does not say which "
                "upload it came from; load the adapter again by its name or path",
            )
        location = locate_path(self.sources, origin)
        logger.info(
            "safelora: adapter '%s' (cache entry %s) had dropped out of the %d adapters this server tracks; "
            "preparing it again from %s", name, entry.name[:16], self.settings.max_tracked_adapters, location.identity,
        )
        return location

    def _locate(self, name: str, lora_path: str | None) -> Location:
        if lora_path is None:
            return locate(self.sources, name)
        return locate_path(self.sources, lora_path)

    def _check_served_as(self, name: str, location: Location, *, by_path: bool) -> None:
        """A served name never lets one tenant's adapter stand in for another's."""
        if by_path and self.settings.served_names == "location" and name != location.name:
            raise AdapterRefused(
                RefusalReason.INVALID_NAME,
                f"an adapter loaded from {location.name!r} is served under that name on this server "
                f"(served_names: location), not as {shown_name(name)}; load it with lora_name={location.name!r}",
            )
        loaded = self._by_name.peek(name)
        if loaded is not None and loaded.location is not None and loaded.location.name != location.name:
            raise AdapterRefused(
                RefusalReason.NAME_IN_USE,
                f"the name already serves the adapter from {loaded.location.name!r}; an adapter from "
                f"{location.name!r} cannot replace it (unload it first if you own it)",
            )

    def _prepare_location(self, name: str, location: Location, tenant: TenantPolicy) -> PreparedAdapter:
        decided_by = (tenant.cache_policy_id(self.bank), tenant.admission.model_dump_json())
        files_key = _files_identity(location.path, decided_by)
        if files_key is not None and (refused := self.refusals.by_files(files_key)) is not None:
            metrics.REFUSAL_CACHE_HITS.inc()
            raise refused
        try:
            files = read_adapter_files(location.path, name=name, limits=self.limits, confine_to=location.confine)
        except AdapterRefused as exc:  # e.g. over the size limits: refused before its content is known
            self.refusals.remember(exc, None, files_key)
            raise
        content_key = (files.content_hash, decided_by)
        if (refused := self.refusals.by_content(content_key)) is not None:
            metrics.REFUSAL_CACHE_HITS.inc()
            self.refusals.remember(refused, content_key, files_key)
            raise refused
        try:
            return self._prepare_files(name, files, location, tenant)
        except AdapterRefused as exc:
            self.refusals.remember(exc, content_key, files_key)
            raise

    def _prepare_files(
        self, name: str, files: AdapterFiles, location: Location, tenant: TenantPolicy
    ) -> PreparedAdapter:
        adapter = parse_adapter(files, limits=self.limits)
        key = CacheKey(
            adapter_hash=adapter.content_hash, bank_id=self.bank.bank_id, policy_id=tenant.cache_policy_id(self.bank)
        )

        def build(tmpdir: Path) -> None:
            start = time.perf_counter()
            outcome = project_for_tenant(
                adapter, self.bank, tenant, name=name, aliases=self.settings.aliases,
                require_base_model_match=self.settings.require_base_model_match,
            )
            written = write_adapter_files(tmpdir, outcome.adapter)
            self._observe_projection(outcome.report, tenant, time.perf_counter() - start)
            return written  # hashed from memory: the seal does not read the files back

        # Leased before it is verified (no eviction can slip in); the lease passes to the
        # map of tracked paths in prepare(), and is given back when the adapter drops out.
        # An entry exists only for an adapter its tenant's rules admitted (they are part
        # of the key), so a hit and a fresh build are read the same way.
        entry, hit = self.cache.get_or_create(key, build, lease=True, origin=_origin(location))
        try:
            report = AdapterReport.model_validate_json((entry.path / REPORT_FILE).read_bytes())
        except BaseException:
            self.cache.release(entry.digest)
            raise
        metrics.CACHE_BYTES.set(self.cache.total_bytes())  # from the index: one row read
        return PreparedAdapter(
            name=name, path=entry.path, digest=entry.digest, report=report, cache_hit=hit,
            location=location, signature=entry_signature(entry.path),
        )

    def _observe_projection(self, report: AdapterReport, tenant: TenantPolicy, seconds: float) -> None:
        metrics.PROJECTIONS.labels(policy=tenant.policy.kind).inc()
        metrics.PROJECTION_SECONDS.observe(seconds)
        metrics.MODULES_PROJECTED.inc(report.summary.projected)
        if report.summary.mean_cosine is not None:
            metrics.ADAPTER_MEAN_COSINE.observe(report.summary.mean_cosine)
        for module in report.modules:
            metrics.MODULE_COSINE.observe(module.cosine)
