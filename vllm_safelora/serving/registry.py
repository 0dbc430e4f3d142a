"""What this server handed to vLLM: the entry paths it may be asked about, and the names it lists.

Both maps are bounded LRUs (``max_tracked_adapters`` each) whose values hold a lease on
their cache entry, so neither memory, leases nor pinned cache bytes grow with the number
of adapters ever served. Holds no policy, reads no adapter: the preparer does that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from .. import metrics
from ..cache import PatchedAdapterCache, entry_signature, signature_racy
from .preparer import PreparedAdapter
from .tracking import LeasedLRU

logger = logging.getLogger("vllm_safelora")


class HandedToVLLM:
    def __init__(self, max_tracked_adapters: int, cache: PatchedAdapterCache):
        self.max_tracked_adapters = max_tracked_adapters
        self.cache = cache
        self._by_path: LeasedLRU[PreparedAdapter] = LeasedLRU(max_tracked_adapters, cache)
        self._by_name: LeasedLRU[PreparedAdapter] = LeasedLRU(max_tracked_adapters, cache)
        # Names that dropped out of the listing while vLLM may still hold them (at most
        # max_tracked_adapters): the integration may unload them from vLLM.
        self._dropped_names: deque[str] = deque(maxlen=max_tracked_adapters)

    def record(self, prepared: PreparedAdapter) -> None:
        """``prepared.path`` is about to be handed to vLLM; the lease get_or_create took passes here."""
        self._by_path.put(str(prepared.path), prepared, leased=True)

    def verified(self, lora_path: str) -> PreparedAdapter | None:
        """Is this path a cache entry this process prepared, unchanged since? (a few stats, no hashing,
        except within a timestamp tick of the entry's last write, where it is hashed again)"""
        prepared = self._by_path.get(lora_path)
        if prepared is None:
            return None
        if prepared.unchanged_on_disk():
            return prepared
        if prepared.signature and signature_racy(prepared.signature, prepared.signed_at_ns):
            proven = self._prove_unchanged(prepared)
            if proven is not None:
                self._by_path.put(lora_path, proven)
                return proven
        logger.warning(
            "safelora: cache entry %s of adapter '%s' changed or vanished on disk since it was verified; "
            "re-verifying and rebuilding it from the uploaded adapter",
            prepared.digest[:16],
            prepared.name,
        )
        return None

    def _prove_unchanged(self, prepared: PreparedAdapter) -> PreparedAdapter | None:
        """A signature taken in the same timestamp tick as a write cannot show a second write in
        that tick: hash the entry again (the cache's verification), then sign it anew."""
        signed_at, signature = time.time_ns(), entry_signature(prepared.path)
        if signature != prepared.signature or self.cache.entry_at(prepared.path) is None:
            return None
        return dataclasses.replace(prepared, signed_at_ns=signed_at)

    def handed_out(self, lora_path: str) -> PreparedAdapter | None:
        """What was handed to vLLM under ``lora_path`` (whatever its entry's state now), or None."""
        return self._by_path.get(lora_path)

    def knows_path(self, lora_path: str) -> bool:
        return lora_path in self._by_path

    def serving(self, name: str) -> PreparedAdapter | None:
        """What ``name`` is listed as serving, without touching its LRU position."""
        return self._by_name.peek(name)

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

    def forget(self, name: str) -> None:
        """The server unloaded ``name``: drop it from the audit listing and give back its lease.

        The entry stays leased while its path is still tracked (a request in flight may
        still make vLLM's worker read it); after that it may be evicted, and it is rebuilt
        if the adapter is asked for again.
        """
        self._by_name.pop(name)

    def loaded(self) -> dict[str, PreparedAdapter]:
        return self._by_name.snapshot()

    def tracking(self) -> dict[str, int]:
        """Sizes of what this server tracks (all bounded): for the status page, tests and benchmarks."""
        return {
            "paths": len(self._by_path),
            "names": len(self._by_name),
            "leases": sum(self.cache.leases.held().values()),
            "max_tracked_adapters": self.max_tracked_adapters,
        }

    def drain_dropped_names(self) -> list[str]:
        """Names dropped from the loaded listing (LRU) since the last call: vLLM still serves them
        from its own table until they are unloaded there (``/v1/unload_lora_adapter``)."""
        out = []
        while self._dropped_names:
            out.append(self._dropped_names.popleft())
        return out
