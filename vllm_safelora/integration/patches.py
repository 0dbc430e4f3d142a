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

import contextvars
import functools
import inspect
import logging
import os
import threading
import time

from .. import metrics
from ..errors import AdapterRefused, Overloaded
from . import authorize, state
from .http_errors import entry_changed_mid_request, service_not_started, to_error_response, to_http_error
from .logs import share_vllm_logging

logger = logging.getLogger("vllm_safelora")

_installed = False
_install_lock = threading.Lock()

# The entry a request's adapter was verified in, as add_request handed it to the engine:
# (served name, entry path, the entry directory's identity then). generate() compares it
# before returning each output, so a request whose entry the worker discarded (it found it
# altered and ran the batch without the adapter) fails instead of answering 200 under the
# adapter's name. A context variable: add_request runs inside generate's own task.
_request_entry: contextvars.ContextVar[tuple[str, str, object] | None] = contextvars.ContextVar(
    "safelora_request_entry", default=None
)


def _entry_unchanged(path: str, identity) -> bool:
    from ..fsutil import FileIdentity

    try:
        return FileIdentity.of(os.stat(path)) == identity
    except OSError:
        return False


def _remember_request_entry(name: str, prepared) -> None:
    if prepared.signature:
        _request_entry.set((name, str(prepared.path), prepared.signature[0]))


def _service_or_503():
    svc = state.service()
    if svc is None:
        raise service_not_started()
    return svc


def _prepare_sync(lora_request, where: str | None = None):
    """Project (or verify) synchronously; rewrite nothing. Raises vLLM's HTTP error on refusal."""
    svc = _service_or_503()
    prepared = svc.verified(lora_request.lora_path)
    if prepared is not None:
        return prepared
    if where is not None:
        metrics.GUARD_EVENTS.labels(where=where).inc()
    try:
        return svc.prepare(lora_request.lora_name, lora_request.lora_path, where=where or "add_lora")
    except (AdapterRefused, Overloaded) as exc:
        raise to_http_error(exc) from None


def _wrap_input_processor_init(cls) -> None:
    """vLLM: builds the input processor once the served model's config is known, before the engine core starts.
    Why: start the service (load and check the bank) there, so a wrong bank stops start-up before any request.
    Hook: ``v1/engine/input_processor:InputProcessor.__init__`` (hooks.py).
    """
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
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
    """vLLM: turns every generation request, online and offline, into an engine request.
    Why: the one choke point every LoRARequest passes: its lora_path becomes the verified cache entry.
    Hook: ``v1/engine/input_processor:InputProcessor.process_inputs`` (hooks.py).
    """
    original = cls.process_inputs
    signature = inspect.signature(original)
    if "lora_request" not in signature.parameters:
        raise RuntimeError("InputProcessor.process_inputs has no lora_request parameter in this vLLM")

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        start = time.perf_counter()
        bound = signature.bind(self, *args, **kwargs)
        lora_request = bound.arguments.get("lora_request")
        if lora_request is not None:
            svc = _service_or_503()
            prepared = svc.verified(lora_request.lora_path)
            ready = prepared is not None
            if not ready:
                prepared = _prepare_sync(lora_request, where="process_inputs")
            svc.mark_loaded(lora_request.lora_name, prepared)
            if lora_request.lora_path != str(prepared.path):
                import msgspec

                bound.arguments["lora_request"] = msgspec.structs.replace(lora_request, lora_path=str(prepared.path))
            if ready:  # what the hook adds to a request whose adapter was already prepared
                metrics.REQUEST_OVERHEAD.labels(hook="process_inputs").observe(time.perf_counter() - start)
        return original(*bound.args, **bound.kwargs)

    cls.process_inputs = process_inputs


def _wrap_async_add_lora(cls) -> None:
    """vLLM: AsyncLLM.add_lora sends an explicit load to the engine core (resolver, load endpoint, static modules).
    Why: whatever called it, only a prepared cache entry may reach the engine.
    Hook: ``v1/engine/async_llm:AsyncLLM.add_lora`` (hooks.py).
    """
    original = cls.add_lora

    @functools.wraps(original)
    async def add_lora(self, lora_request):
        prepared = await state.off_loop(_prepare_sync, lora_request)
        # Mutate: the serving layer stores this very object for later requests.
        lora_request.lora_path = str(prepared.path)
        accepted = await original(self, lora_request)
        if accepted:
            state.service().mark_loaded(lora_request.lora_name, prepared)
        return accepted

    cls.add_lora = add_lora


def _wrap_sync_add_lora(cls) -> None:
    """vLLM: LLMEngine.add_lora is the offline engine's explicit load.
    Why: the same rule offline: only a prepared cache entry reaches the engine.
    Hook: ``v1/engine/llm_engine:LLMEngine.add_lora`` (hooks.py).
    """
    original = cls.add_lora

    @functools.wraps(original)
    def add_lora(self, lora_request):
        prepared = _prepare_sync(lora_request)
        lora_request.lora_path = str(prepared.path)
        accepted = original(self, lora_request)
        if accepted:
            state.service().mark_loaded(lora_request.lora_name, prepared)
        return accepted

    cls.add_lora = add_lora


def _wrap_async_add_request(cls) -> None:
    """vLLM: AsyncLLM.add_request takes every online request, then calls the synchronous process_inputs.
    Why: check (and rebuild, if its entry changed) the request's adapter here, off the event loop.
    Hook: ``v1/engine/async_llm:AsyncLLM.add_request`` (hooks.py).
    """
    original = cls.add_request
    signature = inspect.signature(original)
    if "lora_request" not in signature.parameters:
        raise RuntimeError("AsyncLLM.add_request has no lora_request parameter in this vLLM")

    @functools.wraps(original)
    async def add_request(self, *args, **kwargs):
        start = time.perf_counter()
        bound = signature.bind(self, *args, **kwargs)
        lora_request = bound.arguments.get("lora_request")
        if lora_request is None:  # deprecated path: a pre-built EngineCoreRequest carries it
            lora_request = getattr(bound.arguments.get("prompt"), "lora_request", None)
        if lora_request is not None:
            svc = _service_or_503()
            if not authorize.allowed(lora_request.lora_name, svc.settings):  # a route that skipped _check_model
                from vllm.exceptions import VLLMNotFoundError

                raise VLLMNotFoundError(f"The model `{lora_request.lora_name}` does not exist.")
            # An adapter already prepared and unchanged (a few stats, no I/O beyond them) is
            # checked here on the loop; anything else is prepared on the plugin's threads.
            prepared, rebuilt = svc.verified(lora_request.lora_path), False
            if prepared is not None:
                lora_request.lora_path = str(prepared.path)
                _remember_request_entry(lora_request.lora_name, prepared)
                metrics.REQUEST_OVERHEAD.labels(hook="add_request").observe(time.perf_counter() - start)
                return await original(*bound.args, **bound.kwargs)
            try:
                prepared, rebuilt = await state.off_loop(svc.ensure, lora_request.lora_name, lora_request.lora_path)
            except (AdapterRefused, Overloaded) as exc:
                raise to_http_error(exc) from None
            if rebuilt:
                metrics.GUARD_EVENTS.labels(where="entry_changed").inc()
                # The engine may hold what it read from the old entry (or, if its worker
                # found the entry altered, nothing): make it read the rebuilt one.
                logger.warning(
                    "vllm-safelora: adapter '%s' was rebuilt after its cache entry changed on disk; asking the "
                    "engine to reload it",
                    lora_request.lora_name,
                )
                await self.remove_lora(lora_request.lora_int_id)
            lora_request.lora_path = str(prepared.path)
            _remember_request_entry(lora_request.lora_name, prepared)
        return await original(*bound.args, **bound.kwargs)

    cls.add_request = add_request


def _wrap_async_generate(cls) -> None:
    """vLLM: AsyncLLM.generate adds an online request (through add_request) and yields its outputs.
    Why: an entry found altered by the worker after add_request's check never answers under its name.
    Hook: ``v1/engine/async_llm:AsyncLLM.generate`` (hooks.py).

    The worker removes such an entry before that step's outputs leave the engine, so one
    stat of the entry directory before each output tells. The request is aborted in the
    engine and fails with a 503 naming the adapter (mid-stream: an error event); the next
    request rebuilds the entry from the upload.
    """
    original = cls.generate

    @functools.wraps(original)
    async def generate(self, *args, **kwargs):
        _request_entry.set(None)
        outputs = original(self, *args, **kwargs)
        try:
            async for out in outputs:
                entry = _request_entry.get()
                if entry is not None and not _entry_unchanged(entry[1], entry[2]):
                    metrics.GUARD_EVENTS.labels(where="entry_changed_mid_request").inc()
                    logger.error(
                        "vllm-safelora: adapter '%s': its cache entry %s changed or was removed while request %s "
                        "ran (the worker refuses an altered entry); the request is stopped so that no output of "
                        "another model is returned under the adapter's name",
                        entry[0],
                        entry[1][-64:][:16],
                        kwargs.get("request_id", args[2] if len(args) > 2 else "?"),
                    )
                    raise entry_changed_mid_request(entry[0])
                yield out
        finally:
            await outputs.aclose()

    cls.generate = generate


def _wrap_load_lora_adapter(cls) -> None:
    """vLLM: serves POST /v1/load_lora_adapter and static --lora-modules.
    Why: project off the event loop after vLLM's own checks, and answer a refusal with a 4xx (vLLM would answer 500).
    Hook: ``entrypoints/openai/models/serving:OpenAIServingModels.load_lora_adapter`` (hooks.py).
    """
    original = cls.load_lora_adapter

    @functools.wraps(original)
    async def load_lora_adapter(self, request, base_model_name=None):
        svc = state.service()
        if svc is None or not request.lora_name or not request.lora_path:
            return await original(self, request, base_model_name)
        # vLLM's own checks first (name taken, base-model name): a load vLLM refuses is
        # never projected, cached, listed or counted.
        refused = await self._check_load_lora_adapter_request(request)
        if refused is not None:
            return refused
        try:
            prepared = await state.off_loop(
                svc.prepare_client_path,
                request.lora_name,
                request.lora_path,
                where="load_endpoint",
                operator_label=_static_modules.get(),
            )
        except (AdapterRefused, Overloaded) as exc:
            return to_error_response(exc)
        request = request.model_copy(update={"lora_path": str(prepared.path)})
        try:
            result = await original(self, request, base_model_name)
        finally:
            _drop_name_lock(self, request.lora_name)
        await _unload_dropped(self, svc)
        return result

    cls.load_lora_adapter = load_lora_adapter


_static_modules = contextvars.ContextVar("safelora_static_modules", default=False)


def _wrap_init_static_loras(cls) -> None:
    """vLLM: init_static_loras loads each ``--lora-modules NAME=PATH`` through load_lora_adapter at start-up.
    Why: those loads are the operator's, whose labels may differ from the location (unless they shadow a tenant).
    Hook: ``entrypoints/openai/models/serving:OpenAIServingModels.init_static_loras`` (hooks.py).
    """
    original = cls.init_static_loras

    @functools.wraps(original)
    async def init_static_loras(self):
        token = _static_modules.set(True)
        try:
            return await original(self)
        finally:
            _static_modules.reset(token)

    cls.init_static_loras = init_static_loras


async def _unload_dropped(serving_models, svc) -> None:
    """Bound vLLM's own table of served names: the serving layer keeps every name it ever
    resolved or loaded (and a lock per name). Names the service dropped from its bounded
    listing (least recently used) are unloaded through vLLM's own unload path; a later
    request for one resolves it again, normally a cache hit."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    for stale in svc.drain_dropped_names():
        if stale in serving_models.lora_requests:
            await serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=stale))
        _drop_name_lock(serving_models, stale)


def _drop_name_lock(serving_models, name) -> None:
    """Forget vLLM's per-name lock of a name it does not serve. vLLM's serving layer creates one
    (a defaultdict of asyncio.Lock) for every name a request, load or unload ever asked for and
    never removes it: distinct unknown or refused names (64 KB each) grew the API server without
    bound. Kept while the name is served or anyone holds or waits for the lock, so what it
    serialises is unchanged; the event loop is ours until the next await."""
    if name in serving_models.lora_requests:
        return
    locks = serving_models.lora_resolver_lock
    lock = locks.get(name) if isinstance(name, str) else None
    if lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
        del locks[name]


def _wrap_resolve_lora(cls) -> None:
    """vLLM: asks the resolvers for a model name it does not know, then loads the result.
    Why: names dropped from our bounded listing are unloaded from vLLM too, so its table stays bounded.
    Hook: ``entrypoints/openai/models/serving:OpenAIServingModels.resolve_lora`` (hooks.py).
    """
    original = cls.resolve_lora

    @functools.wraps(original)
    async def resolve_lora(self, lora_name):
        try:
            result = await original(self, lora_name)
        finally:
            _drop_name_lock(self, lora_name)
        svc = state.service()
        if svc is not None:
            await _unload_dropped(self, svc)
        return result

    cls.resolve_lora = resolve_lora


def _wrap_unload_lora_adapter(cls) -> None:
    """vLLM: serves POST /v1/unload_lora_adapter.
    Why: the service forgets the adapter (listing, lease) once vLLM unloaded it.
    Hook: ``entrypoints/openai/models/serving:OpenAIServingModels.unload_lora_adapter`` (hooks.py).
    """
    original = cls.unload_lora_adapter

    @functools.wraps(original)
    async def unload_lora_adapter(self, request):
        try:
            result = await original(self, request)
        finally:
            _drop_name_lock(self, request.lora_name)
        svc = state.service()
        if svc is not None and isinstance(result, str):  # vLLM returns a message on success
            svc.forget(request.lora_name)
        return result

    cls.unload_lora_adapter = unload_lora_adapter


_lazy_load = threading.local()


def _tp_rank() -> str:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return str(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


@functools.lru_cache(maxsize=1)
def _worker_guard(guard_cls, cache_dir):
    # One guard per worker process: it remembers which entries this process has hashed.
    return guard_cls(cache_dir)


def _wrap_worker_set_active_adapters(cls) -> None:
    """vLLM: sets up the adapters of a batch inside execute_model, loading evicted ones lazily.
    Why: a load there must not raise (it would kill the engine): mark it so the guard answers softly.
    Hook: ``lora/worker_manager:WorkerLoRAManager.set_active_adapters`` (hooks.py).
    """
    original = cls.set_active_adapters

    @functools.wraps(original)
    def set_active_adapters(self, *args, **kwargs):
        _lazy_load.active = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _lazy_load.active = False

    cls.set_active_adapters = set_active_adapters


def _wrap_worker_load_adapter(cls) -> None:
    """vLLM: every adapter load in a worker ends here, reading the adapter from lora_path.
    Why: defence in depth: only intact cache entries load, read from the bytes the guard verified.
    Hook: ``lora/worker_manager:WorkerLoRAManager._load_adapter`` (hooks.py).

    Only intact cache entries reach vLLM's loader; an altered one is never served.

    The checks are :class:`~vllm_safelora.cache.worker_guard.WorkerGuard`'s; here vLLM's
    loader is made to read the very weight bytes the guard hashed (verified_read.py). An
    explicit load (add_lora) that fails gets an error. A lazy load inside execute_model (a
    re-read after vLLM's own LRU evicted the adapter) must not raise, because that kills
    the engine: the altered entry is removed (so the front end rebuilds it from the
    tenant's upload on the next request and has the engine reload it) and this batch
    runs the request without the adapter, i.e. as the base model.
    """
    from ..adapters import WEIGHTS_FILE
    from ..cache import CorruptEntry
    from ..cache.worker_guard import EntryRefused, WorkerGuard
    from . import verified_read

    verified_read.install()
    original = cls._load_adapter

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        settings = state.settings()
        path = lora_request.lora_path

        def read_through_vllm(weights, data: bytes):
            with verified_read.serving(weights, data) as pending:
                lora = original(self, lora_request)
            if not pending.served:
                raise CorruptEntry(f"vLLM did not read {WEIGHTS_FILE} through the verified read")
            return lora

        try:
            entry, lora = _worker_guard(WorkerGuard, settings.cache_dir).load(path, read_through_vllm)
        except EntryRefused as refused:
            problem, removed = refused.problem, refused.removed
        else:
            logger.info(
                "vllm-safelora worker guard (pid %d, tensor-parallel rank %s): adapter '%s' loaded from "
                "verified cache entry %s",
                os.getpid(),
                _tp_rank(),
                lora_request.lora_name,
                entry.name[:16],
            )
            return lora
        metrics.GUARD_EVENTS.labels(where="worker").inc()
        message = (
            f"vllm-safelora: refusing to load adapter '{lora_request.lora_name}' from {path!r}: it is not an intact "
            f"entry of the patched-adapter cache ({problem}). Load adapters through the resolver, "
            "/v1/load_lora_adapter or --lora-modules"
        )
        if removed:
            message += "; the entry was removed and is rebuilt from the uploaded adapter on its next request"
        if getattr(_lazy_load, "active", False):
            logger.error(
                "%s. This batch runs the adapter's requests WITHOUT it (base model) instead of stopping the "
                "engine; check the disk under %s",
                message,
                settings.cache_dir,
            )
            # vLLM's own zero-initialised adapter (what it warms up with): applying it adds nothing.
            return self._adapter_manager.create_dummy_lora(
                lora_request.lora_int_id, self.lora_config.max_lora_rank, self.embedding_modules
            )
        logger.error("%s", message)
        raise ValueError(message)

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

        from . import lora_isolation

        _wrap_input_processor_init(InputProcessor)
        _wrap_process_inputs(InputProcessor)
        _wrap_async_add_lora(AsyncLLM)
        _wrap_async_add_request(AsyncLLM)
        _wrap_async_generate(AsyncLLM)
        _wrap_sync_add_lora(LLMEngine)
        _wrap_load_lora_adapter(OpenAIServingModels)
        _wrap_unload_lora_adapter(OpenAIServingModels)
        _wrap_init_static_loras(OpenAIServingModels)
        _wrap_resolve_lora(OpenAIServingModels)
        _wrap_worker_load_adapter(WorkerLoRAManager)
        _wrap_worker_set_active_adapters(WorkerLoRAManager)
        authorize.install()
        lora_isolation.install()  # vLLM 0.32's CPU LoRA ops gave rows without a LoRA the last slot's LoRA
        _installed = True
