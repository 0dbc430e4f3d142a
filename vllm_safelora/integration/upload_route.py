"""PUT and DELETE /safelora/v1/adapters/{tenant}/{adapter}: the HTTP side of uploads.

Receives the body with an idle and an overall deadline (a client that never finishes
holds one connection for at most ``upload_timeout_s``), hands the chunks to
:class:`~vllm_safelora.serving.uploads.StagedParts`, runs validation and the tenant's
policy on the staged copy off the event loop, publishes it, and makes vLLM drop any
version it still holds so the next request serves the new one.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import AdapterRefused, Overloaded
from ..serving.access import owns
from ..serving.uploads import MULTIPART_SLACK, StagedParts, StagedSource, UploadArea, UploadRefused
from ..sources.names import namespace_of, validate_adapter_name
from . import auth, state
from .answers import missing, report_body
from .http_errors import http_status

logger = logging.getLogger("vllm_safelora")

_area: UploadArea | None = None
_area_lock = threading.Lock()


def upload_area(svc) -> UploadArea | None:
    global _area
    root = svc.settings.auth.upload_root
    if root is None:
        return None
    with _area_lock:
        if _area is None:
            a = svc.settings.auth
            _area = UploadArea(
                root,
                max_adapters=a.max_adapters_per_tenant,
                max_bytes=a.max_bytes_per_tenant,
                per_minute=a.uploads_per_minute,
            )
        return _area


def _refused(status: int, message: str, retry_after: int | None = None, **extra) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"message": message, "code": status, **extra}}, status_code=status, headers=headers)


def _writable(svc, name: str) -> bool:
    who = auth.current(svc.settings)
    return owns(who, name) or (who.admin and svc.settings.auth.enabled and "/" in name)


def _boundary(request: Request) -> bytes:
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
        raise UploadRefused(
            415,
            "send the adapter as multipart/form-data with parts adapter_config.json and "
            "adapter_model.safetensors (curl -F adapter_config.json=@... -F adapter_model.safetensors=@...)",
        )
    return boundary


async def _receive(request: Request, parts: StagedParts, limit: int, idle_s: float, total_s: float) -> None:
    from starlette.requests import ClientDisconnect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s
    stream = request.stream().__aiter__()
    received = 0
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise UploadRefused(408, f"the upload took longer than auth.upload_timeout_s ({total_s:g} s)")
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), min(idle_s, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadRefused(
                408,
                f"the upload sent nothing for {min(idle_s, left):g} s (auth.upload_idle_timeout_s: {idle_s:g}; "
                f"auth.upload_timeout_s: {total_s:g})",
            ) from None
        except ClientDisconnect:
            raise UploadRefused(400, "the client went away before the upload ended") from None
        received += len(chunk)
        if received > limit:
            raise UploadRefused(413, f"the upload is larger than its limit of {limit} bytes")
        if chunk:
            parts.feed(chunk)


async def put(svc, name: str, request: Request) -> JSONResponse:
    if not _writable(svc, name):
        return missing(name)
    area = upload_area(svc)
    if area is None:
        return _refused(403, "uploads are off on this server (auth.upload_root is not set)")
    try:  # '<tenant>/<adapter>': _writable saw the slash
        validate_adapter_name(name)
    except AdapterRefused as exc:
        return _refused(400, str(exc), reason="invalid_name")
    cfg = svc.settings.auth
    try:
        area.start(namespace_of(name))
        caps = area.caps(name, svc.limits.max_config_bytes, svc.limits.max_bytes)
        limit = sum(cap for cap, _ in caps.values()) + MULTIPART_SLACK
        boundary = _boundary(request)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise UploadRefused(413, f"the upload declares {declared[:20]} bytes; its limit is {limit}")
        with area.staged() as staged:
            parts = StagedParts(staged, boundary, caps)
            try:
                await _receive(request, parts, limit, cfg.upload_idle_timeout_s, cfg.upload_timeout_s)
                parts.finish()
            finally:
                parts.close()
            area.check_total(name, sum(parts.sizes.values()))
            location = StagedSource().location(name, staged)
            checked = await state.off_loop(svc.preparer.prepare, name, lambda: location, "upload")
            svc.cache.release(checked.digest)  # re-leased below, from where it is published
            replaced = await state.off_loop(area.publish, staged, name)
    except UploadRefused as exc:
        logger.warning("safelora: upload of '%s' refused: %s", name, exc)
        return _refused(exc.status, str(exc), exc.retry_after)
    except AdapterRefused as exc:
        return _refused(int(http_status(exc)), f"vllm-safelora: {exc}", reason=exc.reason.value, refused=True)
    except Overloaded as exc:
        return _refused(503, f"vllm-safelora: {exc}", max(1, int(svc.retry_after_s())))
    await _drop_served(svc, request, name)
    try:  # the published copy, normally a cache hit: what the audit routes show from now on
        prepared = await state.off_loop(svc.prepare, name)
        svc.mark_loaded(name, prepared)
    except (AdapterRefused, Overloaded):
        prepared = checked
    body = report_body(name, prepared)
    body["replaced"] = replaced
    return JSONResponse(body, status_code=200 if replaced else 201)


async def delete(svc, name: str, request: Request) -> JSONResponse:
    if not _writable(svc, name):
        return missing(name)
    area = upload_area(svc)
    if area is None:
        return missing(name)
    try:
        validate_adapter_name(name)
    except AdapterRefused:
        return missing(name)
    if not await state.off_loop(area.delete, name):
        return missing(name)
    await _drop_served(svc, request, name)
    return JSONResponse({"deleted": name})


async def _drop_served(svc, request: Request, name: str) -> None:
    """vLLM keeps serving the entry it loaded for ``name``: unload it (its own path, which our
    wrapper follows by forgetting the name), so the next request resolves the name again."""
    models = getattr(request.app.state, "openai_serving_models", None)
    if models is not None and name in models.lora_requests:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    svc.forget(name)
