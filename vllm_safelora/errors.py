"""Exception families.

Three families, because each one is handled differently by the server:

* ``AdapterRefused``: this adapter (a tenant's upload) is not served. The server
  maps it to an HTTP 4xx naming the adapter and the reason, counts it in
  ``safelora_refusals_total{reason}`` and keeps serving everyone else.
* ``BankError``: the alignment bank is missing, corrupt, or built for another
  model. At start-up this stops the server (fail closed).
* ``ConfigError``: the plugin is misconfigured. Also stops the server.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class RefusalReason(str, enum.Enum):
    """Machine-readable refusal reasons; used as the Prometheus ``reason`` label."""

    NOT_FOUND = "not_found"
    INVALID_NAME = "invalid_name"
    INVALID_CONFIG = "invalid_config"
    NOT_LORA = "not_lora"
    UNSUPPORTED_FEATURE = "unsupported_feature"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    UNKNOWN_MODULE = "unknown_module"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    RANK_MISMATCH = "rank_mismatch"
    RANK_TOO_LARGE = "rank_too_large"
    NON_FINITE = "non_finite"
    BAD_DTYPE = "bad_dtype"
    PICKLE_ONLY = "pickle_only"
    MALFORMED_TENSORS = "malformed_tensors"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    ADMISSION = "admission"
    CHANGED_WHILE_READING = "changed_while_reading"
    DUPLICATE_MODULE = "duplicate_module"  # two tensors vLLM would load into one module
    UPDATE_OVERFLOW = "update_overflow"  # s*B*A (or alpha) not safely finite in the served dtype
    VLLM_UNSUPPORTED = "vllm_unsupported"  # the served vLLM's own PEFTHelper refuses the config
    NAME_IN_USE = "name_in_use"
    OUTSIDE_NAMESPACE = "outside_namespace"  # a link leads out of the tenant's namespace (and the shared areas)


class SafeLoRAError(Exception):
    """Base class for every error this package raises on purpose."""


class AdapterRefused(SafeLoRAError):
    """The adapter is refused; nothing was written and nothing will be served.

    ``reason`` is a :class:`RefusalReason`; ``adapter`` names the adapter (its
    served name or path); ``detail`` says what is wrong and where (file,
    module, key) so the tenant can fix it.
    """

    def __init__(self, reason: RefusalReason, detail: str, adapter: str | None = None):
        self.reason = RefusalReason(reason)
        self.detail = detail
        self.adapter = adapter
        super().__init__(self._message())

    def _message(self) -> str:
        who = f"adapter '{self.adapter}'" if self.adapter else "adapter"
        return f"{who} refused ({self.reason.value}): {self.detail}"

    def for_adapter(self, adapter: str) -> AdapterRefused:
        """Return the same refusal, naming ``adapter`` (keeps the first name given)."""
        if self.adapter is None:
            self.adapter = adapter
            self.args = (self._message(),)
        return self


class BankError(SafeLoRAError):
    """The alignment bank cannot be built, read or trusted."""


class ConfigError(SafeLoRAError):
    """The plugin or a command is misconfigured."""


class Overloaded(SafeLoRAError):
    """Too many adapters are being prepared at once: try again shortly (HTTP 503, Retry-After)."""

    def __init__(self, detail: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"the server is busy preparing other adapters: {detail}")


class CacheUnavailable(Overloaded):
    """The patched-adapter cache cannot store a new entry (its file system is full or read-only):
    not the adapter's fault, so a 503 with Retry-After, never a refusal remembered against it."""

    def __init__(self, cache_dir: object, fault: str, detail: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        self.fault = fault
        self.cache_dir = str(cache_dir)
        SafeLoRAError.__init__(
            self,
            f"new adapters cannot be stored: the patched-adapter cache directory (cache_dir {self.cache_dir}) is "
            f"{fault.replace('_', '-')} ({detail}). Adapters already cached are still served; try again in "
            f"{retry_after_s:.0f} s. Operator: free space in cache_dir (or lower cache_max_bytes) or make it "
            "writable",
        )


def list_problems(details: Sequence[str], shown: int) -> str:
    """The first ``shown`` problems, then how many more: a message bounded whatever an input holds."""
    text = "; ".join(details[:shown])
    if len(details) > shown:
        text += f"; and {len(details) - shown} more problems"
    return text


class Problems:
    """Collects every problem, then refuses once with the first reason (as vLLM's PEFTHelper reports)."""

    def __init__(self, adapter: str | None, shown: int = 20):
        self.adapter = adapter
        self.shown = shown
        self.items: list[tuple[RefusalReason, str]] = []

    def add(self, reason: RefusalReason, detail: str) -> None:
        self.items.append((reason, detail))

    def raise_if_any(self) -> None:
        if self.items:
            details = list_problems([d for _, d in self.items], self.shown)
            raise AdapterRefused(self.items[0][0], details, adapter=self.adapter)


class SourceUnavailable(Overloaded):
    """An adapter source (object storage) cannot answer now: unreachable, too slow, throttling, or
    refusing this server's credentials. HTTP 503 with Retry-After, like an overloaded throttle: only
    the tenant whose adapter is not yet prepared waits; adapters already prepared keep being served."""

    def __init__(self, detail: str, retry_after_s: float, reason: str):
        self.retry_after_s = retry_after_s
        self.reason = reason
        SafeLoRAError.__init__(self, f"vllm-safelora cannot reach the adapter store now ({reason}): {detail}")
