"""The one door every entry point uses: where an adapter is, prepared, and what vLLM was handed.

The vLLM integration calls :meth:`SafeLoRAService.prepare` (names from the resolver,
paths the integration holds) or :meth:`SafeLoRAService.prepare_client_path` (paths an
API client typed) for every adapter it sees, and hands vLLM only the cache entry
directory that comes back. Finding the upload is decided here; reading, the policy
and the cache are the :class:`~.preparer.AdapterPreparer`'s; what vLLM holds is the
:class:`~.registry.HandedToVLLM`'s. Holds no math, imports no vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from collections.abc import Callable, Sequence

from ..adapters import ReadLimits
from ..bank import AlignmentBank
from ..cache import PatchedAdapterCache, entry_path_in
from ..cache.shared_tier import SharedTier
from ..config import SafeLoRASettings
from ..errors import AdapterRefused, RefusalReason
from ..sources import AdapterSource, Location, locate, locate_path, shown_name
from .client_input import MAX_LORA_PATH, check_lora_path, check_served_name
from .preparer import AdapterPreparer, PreparedAdapter
from .registry import HandedToVLLM
from .startup import announce_start, build_shared_tier, build_sources, load_checked_bank

logger = logging.getLogger("vllm_safelora")


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
        shared_tier: SharedTier | None = None,
    ):
        self.settings = settings
        self.bank = bank
        self.sources = list(sources)
        self.cache = cache
        # The integration passes limits that follow the served vLLM (its dtype, rank and
        # name rules); without them (tests, offline use) only size and rank are bounded.
        self.limits = limits or ReadLimits(max_bytes=settings.max_adapter_bytes, max_rank=max_rank)
        self.preparer = AdapterPreparer(settings, bank, cache, self.limits, shared_tier)
        self.handed = HandedToVLLM(settings.max_tracked_adapters, cache)
        self.throttle = self.preparer.throttle
        self.refusals = self.preparer.refusals

    @classmethod
    def start(
        cls,
        settings: SafeLoRASettings,
        served_model: str,
        *,
        max_rank: int | None = None,
        limits: ReadLimits | None = None,
    ) -> SafeLoRAService:
        """Load the bank, check it protects ``served_model``, open sources and cache; fail closed."""
        bank = load_checked_bank(settings, served_model)
        cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes, verify=settings.verify_cache)
        limits = limits or ReadLimits(max_bytes=settings.max_adapter_bytes, max_rank=max_rank)
        service = cls(
            settings,
            bank,
            build_sources(settings, limits),
            cache,
            max_rank=max_rank,
            limits=limits,
            shared_tier=build_shared_tier(settings),
        )
        announce_start(settings, served_model, bank, service.sources, cache)
        if service.preparer.shared is not None:
            logger.info(
                "safelora: fleet-shared tier of projected entries at %s (entries signed with the fleet key in %s)",
                service.preparer.shared.store.describe(),
                settings.shared_cache.mac_key_file,
            )
        return service

    # ------------------------------------------------------------------ what vLLM holds

    def verified(self, lora_path: str) -> PreparedAdapter | None:
        return self.handed.verified(lora_path)

    def retry_after_s(self) -> float:
        return self.preparer.retry_after_s()

    def loaded(self) -> dict[str, PreparedAdapter]:
        return self.handed.loaded()

    def tracking(self) -> dict[str, int]:
        return self.handed.tracking()

    def drain_dropped_names(self) -> list[str]:
        return self.handed.drain_dropped_names()

    def forget(self, name: str) -> None:
        self.handed.forget(name)

    def mark_loaded(self, name: str, prepared: PreparedAdapter) -> None:
        self.handed.mark_loaded(name, prepared)

    # ------------------------------------------------------------------ preparing

    def ensure(self, name: str, lora_path: str, where: str = "request") -> tuple[PreparedAdapter, bool]:
        """The verified entry for a request's adapter, rebuilding it if it changed on disk.

        Returns ``(prepared, rebuilt)``: ``rebuilt`` means the path had been handed to vLLM
        before and its entry was rebuilt, so the engine must drop what it holds for it.
        """
        known = self.handed.verified(lora_path)
        if known is not None:
            return known, False
        # A path handed out before (tracked, or an entry path dropped from the bounded map):
        # what the engine read from it is stale only if the entry had to be rebuilt or moved.
        # A re-verification that finds it intact (a touch, a signature taken too soon after
        # the write to be trusted) needs no reload.
        handed_out = self.handed.knows_path(lora_path) or self._entry_path(lora_path) is not None
        prepared = self.prepare(name, lora_path, where=where)
        return prepared, handed_out and (not prepared.cache_hit or str(prepared.path) != lora_path)

    def prepare(self, name: str, lora_path: str | None = None, *, where: str = "resolver") -> PreparedAdapter:
        """An adapter by its name (``lora_path`` None: found through the sources), or by a path the
        integration holds (a static module's, an offline request's, or a cache entry this server
        handed vLLM earlier, which is re-verified and rebuilt from its upload if it changed).

        Raises AdapterRefused (already counted in the metrics) or Overloaded.
        """
        if lora_path is not None and (known := self.handed.verified(lora_path)) is not None:
            return known if known.name == name else dataclasses.replace(known, name=name)
        return self._prepare(name, lora_path, where, lambda: self._where_held(name, lora_path))

    def prepare_client_path(
        self, name: str, lora_path: str | None, *, where: str = "load_endpoint", operator_label: bool = False
    ) -> PreparedAdapter:
        """An adapter by a path an API client typed: a cache entry path is treated like any other
        path (it must lie under adapter_dirs), so one tenant cannot load another's projected
        adapter by its entry path. ``operator_label``: the name is an operator's static
        ``--lora-modules`` label, which may differ from the location unless it shadows a tenant."""
        return self._prepare(name, lora_path, where, lambda: self._where_typed(name, lora_path, operator_label))

    def _prepare(self, name: str, lora_path: str | None, where: str, find: Callable[[], Location]) -> PreparedAdapter:
        def checked_find() -> Location:
            check_served_name(name)
            if lora_path is not None:
                check_lora_path(lora_path)
            return find()

        prepared = self.preparer.prepare(name, checked_find, where)
        self.handed.record(prepared)
        return prepared

    # ------------------------------------------------------------------ where the upload is

    def _where_held(self, name: str, lora_path: str | None) -> Location:
        if lora_path is not None:
            previous = self.handed.handed_out(lora_path)
            if previous is not None and previous.location is not None:
                return previous.location  # its entry vanished or was altered: rebuild from the upload
            if (untracked := self._untracked_entry_location(name, lora_path)) is not None:
                return untracked
        return self._where_typed(name, lora_path)

    def _where_typed(self, name: str, lora_path: str | None, operator_label: bool = False) -> Location:
        location = locate(self.sources, name) if lora_path is None else locate_path(self.sources, lora_path)
        self._check_served_as(name, location, by_path=lora_path is not None, operator_label=operator_label)
        return location

    def _shadowed_namespace(self, label: str) -> str | None:
        """The tenant namespace (or source) a label would stand in for, if any: its first component
        is a directory under an adapter root, or it is addressed to a prefixed source (hub:)."""
        from ..sources import LocalDirSource
        from ..sources.names import namespace_of

        if any(src.claims(label) for src in self.sources):
            return label
        ns = namespace_of(label)
        for src in self.sources:
            if isinstance(src, LocalDirSource) and ns and not ns.startswith(".") and os.path.lexists(src.root / ns):
                return ns
        return None

    def _entry_path(self, lora_path: str | None) -> Path | None:
        """``lora_path`` resolved if it names an entry directory of this server's cache."""
        if (
            not isinstance(lora_path, str)
            or not lora_path.isprintable()
            or not os.path.isabs(lora_path)
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
            "preparing it again from %s",
            name,
            entry.name[:16],
            self.settings.max_tracked_adapters,
            location.identity,
        )
        return location

    def _check_served_as(self, name: str, location: Location, *, by_path: bool, operator_label: bool = False) -> None:
        """A served name never lets one tenant's adapter stand in for another's."""
        if by_path and self.settings.served_names == "location" and name != location.name:
            if operator_label and (shadowed := self._shadowed_namespace(name)) is None:
                logger.info("safelora: static module label '%s' serves the adapter from %r", name, location.name)
                return
            if operator_label:
                raise AdapterRefused(
                    RefusalReason.INVALID_NAME,
                    f"the --lora-modules label {shown_name(name)} would shadow tenant namespace {shown_name(shadowed)} "
                    f"(served_names: location); choose a label that is no directory under the adapter roots, or "
                    f"use lora_name={location.name!r}",
                )
            raise AdapterRefused(
                RefusalReason.INVALID_NAME,
                f"an adapter loaded from {location.name!r} is served under that name on this server "
                f"(served_names: location), not as {shown_name(name)}; load it with lora_name={location.name!r}",
            )
        loaded = self.handed.serving(name)
        if loaded is not None and loaded.location is not None and loaded.location.name != location.name:
            raise AdapterRefused(
                RefusalReason.NAME_IN_USE,
                f"the name already serves the adapter from {loaded.location.name!r}; an adapter from "
                f"{location.name!r} cannot replace it (unload it first if you own it)",
            )
