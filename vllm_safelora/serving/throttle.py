"""A bound on how many adapters are read and projected at once, with a bounded wait.

Preparing a new adapter costs a read of up to ``max_adapter_bytes``, a parse and a
projection. Without a bound, a flood of new (or hostile) adapters under fresh names
takes every CPU and thread the API server has and starves other tenants' requests.
Beyond ``running + queued`` the caller is answered at once with :class:`Overloaded`
(HTTP 503 with Retry-After, like vLLM's own queue overflow), never made to wait.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .. import metrics
from ..errors import Overloaded


class PreparationThrottle:
    def __init__(self, max_running: int, max_queued: int, retry_after_s: float = 2.0):
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._slots = threading.BoundedSemaphore(max_running)
        self._guard = threading.Lock()
        self._admitted = 0  # running + waiting
        metrics.PREPARE_CAPACITY.set(max_running)

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextlib.contextmanager
    def slot(self, adapter: str, where: str) -> Iterator[None]:
        """Run the body with one of ``max_running`` slots, or raise Overloaded at once."""
        with self._guard:
            if self._admitted >= self.max_running + self.max_queued:
                metrics.OVERLOAD.labels(where=where).inc()
                raise Overloaded(
                    f"{self._admitted} adapters are being prepared or waiting (limit {self.max_running} at once, "
                    f"{self.max_queued} waiting); adapter '{adapter}' was not read. Retry in a few seconds",
                    retry_after_s=self.retry_after_s,
                )
            self._admitted += 1
        try:
            with self._slots:
                metrics.PREPARE_INFLIGHT.inc()
                try:
                    yield
                finally:
                    metrics.PREPARE_INFLIGHT.dec()
        finally:
            with self._guard:
                self._admitted -= 1
