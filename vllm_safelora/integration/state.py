"""Per-process plugin state: the settings, and the service once the front end starts it."""

from __future__ import annotations

import threading

from ..adapters import ReadLimits
from ..config import SafeLoRASettings
from ..serving.service import SafeLoRAService

_lock = threading.Lock()
_settings: SafeLoRASettings | None = None
_service: SafeLoRAService | None = None


def set_settings(settings: SafeLoRASettings) -> None:
    global _settings
    _settings = settings


def settings() -> SafeLoRASettings:
    if _settings is None:
        raise RuntimeError("vllm-safelora plugin was not registered in this process")
    return _settings


def start_service(served_model: str, limits: ReadLimits) -> SafeLoRAService:
    """Start the service once per process (the front end); later engines reuse it."""
    global _service
    with _lock:
        if _service is None:
            _service = SafeLoRAService.start(settings(), served_model, limits=limits)
        elif not _service.bank.manifest.protects(served_model, _service.settings.aliases):
            from ..errors import BankError

            raise BankError(
                f"this process already serves with bank {_service.bank.bank_id}, which does not protect '{served_model}'"
            )
        return _service


def service() -> SafeLoRAService | None:
    return _service


_executor = None


def executor():
    """The plugin's threads for adapter work: one per preparation slot and queue place, so
    waiting for a slot never takes a thread from vLLM's default executor."""
    global _executor
    with _lock:
        if _executor is None:
            from concurrent.futures import ThreadPoolExecutor

            s = settings()
            _executor = ThreadPoolExecutor(
                max_workers=s.max_concurrent_preparations + s.max_queued_preparations + 1,
                thread_name_prefix="safelora-prepare",
            )
        return _executor


async def off_loop(fn, *args, **kwargs):
    """Run adapter work on the plugin's own threads: never on the event loop, and never
    on the loop's default executor, which vLLM uses for its own blocking work."""
    import asyncio
    import functools

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor(), functools.partial(fn, *args, **kwargs))
