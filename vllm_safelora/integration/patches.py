"""Wrappers around the vLLM methods every adapter load passes through.

Front end (API server, or the offline ``LLM`` process):

* ``InputProcessor.__init__``: start the service (load and check the bank) as
  soon as the served model is known, before the engine core starts, so a
  wrong bank stops start-up.
* ``OpenAIServingModels.load_lora_adapter``: ``POST /v1/load_lora_adapter``
  and static ``--lora-modules``; projects off the event loop and answers a
  refusal with a 4xx (vLLM would turn any add_lora failure into a 500).
* ``AsyncLLM.add_lora`` / ``LLMEngine.add_lora``: every explicit load,
  whatever called it.
* ``InputProcessor.process_inputs``: every generation request, online and
  offline; the request's ``lora_path`` is rewritten to the verified entry.

Worker (defence in depth): ``WorkerLoRAManager._load_adapter`` refuses any
path that is not an intact cache entry, which also stops vLLM's fallback of
downloading non-local paths from the hub inside the worker.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading

from .. import metrics
from ..errors import AdapterRefused
from . import state
from .errors import to_error_response, to_http_error

logger = logging.getLogger("vllm_safelora")

_installed = False
_install_lock = threading.Lock()


def _prepare_sync(lora_request, where: str | None = None):
    """Project (or verify) synchronously; rewrite nothing. Raises vLLM's 4xx error on refusal."""
    svc = state.service()
    if svc is None:
        from vllm.exceptions import GracefulHTTPError
        from http import HTTPStatus

        raise GracefulHTTPError(
            "vllm-safelora: LoRA request before the plugin's service started; refusing to load an unprojected adapter",
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
    prepared = svc.verified(lora_request.lora_path)
    if prepared is not None:
        return prepared
    if where is not None:
        metrics.GUARD_EVENTS.labels(where=where).inc()
    try:
        return svc.prepare(lora_request.lora_name, lora_request.lora_path)
    except AdapterRefused as exc:
        raise to_http_error(exc) from None


def _wrap_input_processor_init(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        from .plugin import share_vllm_logging

        share_vllm_logging()
        lora_config = vllm_config.lora_config
        if lora_config is None:
            logger.warning(
                "vllm-safelora: LoRA is not enabled (--enable-lora), so no adapter can be served and the "
                "plugin stays idle"
            )
            return
        from .vllm_rules import read_limits_for

        state.start_service(vllm_config.model_config.model, read_limits_for(vllm_config, state.settings()))

    cls.__init__ = __init__


def _wrap_process_inputs(cls) -> None:
    original = cls.process_inputs
    signature = inspect.signature(original)
    if "lora_request" not in signature.parameters:
        raise RuntimeError("InputProcessor.process_inputs has no lora_request parameter in this vLLM")

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        lora_request = bound.arguments.get("lora_request")
        if lora_request is not None:
            prepared = _prepare_sync(lora_request, where="process_inputs")
            if lora_request.lora_path != str(prepared.path):
                import msgspec

                bound.arguments["lora_request"] = msgspec.structs.replace(lora_request, lora_path=str(prepared.path))
        return original(*bound.args, **bound.kwargs)

    cls.process_inputs = process_inputs


def _wrap_async_add_lora(cls) -> None:
    original = cls.add_lora

    @functools.wraps(original)
    async def add_lora(self, lora_request):
        svc = state.service()
        if svc is None or svc.verified(lora_request.lora_path) is None:
            # Projection is CPU/GPU work: keep it off the event loop.
            prepared = await asyncio.to_thread(_prepare_sync, lora_request)
            # Mutate: the serving layer stores this very object for later requests.
            lora_request.lora_path = str(prepared.path)
        return await original(self, lora_request)

    cls.add_lora = add_lora


def _wrap_sync_add_lora(cls) -> None:
    original = cls.add_lora

    @functools.wraps(original)
    def add_lora(self, lora_request):
        prepared = _prepare_sync(lora_request)
        lora_request.lora_path = str(prepared.path)
        return original(self, lora_request)

    cls.add_lora = add_lora


def _wrap_load_lora_adapter(cls) -> None:
    original = cls.load_lora_adapter

    @functools.wraps(original)
    async def load_lora_adapter(self, request, base_model_name=None):
        svc = state.service()
        if svc is None or not request.lora_name or not request.lora_path:
            return await original(self, request, base_model_name)
        try:
            prepared = await asyncio.to_thread(
                functools.partial(svc.prepare, request.lora_name, request.lora_path, trust_cache_paths=False)
            )
        except AdapterRefused as exc:
            return to_error_response(exc)
        request = request.model_copy(update={"lora_path": str(prepared.path)})
        return await original(self, request, base_model_name)

    cls.load_lora_adapter = load_lora_adapter


def _wrap_unload_lora_adapter(cls) -> None:
    original = cls.unload_lora_adapter

    @functools.wraps(original)
    async def unload_lora_adapter(self, request):
        result = await original(self, request)
        svc = state.service()
        if svc is not None and isinstance(result, str):  # vLLM returns a message on success
            svc.forget(request.lora_name)
        return result

    cls.unload_lora_adapter = unload_lora_adapter


def _wrap_worker_load_adapter(cls) -> None:
    original = cls._load_adapter
    holder: dict[str, object] = {}

    def worker_cache():
        if "cache" not in holder:
            from ..cache import PatchedAdapterCache

            s = state.settings()
            holder["cache"] = PatchedAdapterCache(s.cache_dir, s.cache_max_bytes, verify=True)
        return holder["cache"]

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        path = lora_request.lora_path
        if not path or not os.path.isabs(path) or worker_cache().entry_at(path) is None:
            metrics.GUARD_EVENTS.labels(where="worker").inc()
            raise ValueError(
                f"vllm-safelora: refusing to load adapter '{lora_request.lora_name}' from {path!r}: it is not an "
                "intact entry of the patched-adapter cache, so it was not projected (or was altered on disk). "
                "Load adapters through the resolver, /v1/load_lora_adapter or --lora-modules"
            )
        return original(self, lora_request)

    cls._load_adapter = _load_adapter


def install() -> None:
    """Install every wrapper once per process (class-level; harmless where unused)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.lora.worker_manager import WorkerLoRAManager
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm.v1.engine.llm_engine import LLMEngine

        _wrap_input_processor_init(InputProcessor)
        _wrap_process_inputs(InputProcessor)
        _wrap_async_add_lora(AsyncLLM)
        _wrap_sync_add_lora(LLMEngine)
        _wrap_load_lora_adapter(OpenAIServingModels)
        _wrap_unload_lora_adapter(OpenAIServingModels)
        _wrap_worker_load_adapter(WorkerLoRAManager)
        _installed = True
