"""``vllm.endpoint_plugins`` entry point ``safelora_routes``: the audit API on vLLM's own port,
and the authentication in front of every route (auth.py).

GET    /safelora/v1/status            bank, device, policy, cache (operators)
GET    /safelora/v1/adapters          the adapters this server prepared that the caller may use, with summaries
GET    /safelora/v1/adapters/{name}   one adapter's full report (per-module cosines, hashes)
PUT    /safelora/v1/adapters/{t}/{a}  upload into the caller's namespace; answered with the report (uploads.py)
DELETE /safelora/v1/adapters/{t}/{a}  delete an upload of the caller's namespace, unloading it from vLLM

An adapter the caller may not use is answered exactly as one that does not exist.

vLLM loads endpoint plugins only when VLLM_PLUGINS names them
(``VLLM_PLUGINS=safelora,safelora_routes``; ``vllm-safelora serve`` sets it).
"""

from __future__ import annotations

from argparse import Namespace

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..policies.tenant_rules import describe_rules
from ..serving.access import may_use_in
from . import auth, state, upload_route
from .answers import missing, report_body

ROUTE_PREFIX = "/safelora/v1"


def _unavailable() -> JSONResponse:
    return JSONResponse({"error": "vllm-safelora service is not running in this server"}, status_code=503)


def build_router() -> APIRouter:
    router = APIRouter(prefix=ROUTE_PREFIX, tags=["safelora"])

    @router.get("/status")
    async def status() -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        m = svc.bank.manifest
        return JSONResponse(
            {
                "bank_id": m.bank_id,
                "bank_path": str(svc.bank.path),
                "aligned_model": m.aligned.ref,
                "device": str(svc.bank.device),
                "bank_bytes": svc.bank.nbytes,
                "policies": describe_rules(svc.settings),
                "admission": svc.settings.admission.model_dump(mode="json"),
                "cache_dir": str(svc.cache.root),
                "cache_bytes": svc.cache.total_bytes(),
                "cache_max_bytes": svc.cache.max_bytes,
                "adapters_loaded": len(svc.loaded()),
            }
        )

    @router.get("/adapters")
    async def adapters() -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        who = auth.current(svc.settings)
        return JSONResponse(
            {
                name: {"cache_entry": p.digest, **p.report.summary.model_dump(mode="json")}
                for name, p in sorted(svc.loaded().items())
                if may_use_in(who, name, svc.settings)
            }
        )

    @router.get("/adapters/{name:path}")
    async def adapter_report(name: str) -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        prepared = svc.loaded().get(name)
        if prepared is None or not may_use_in(auth.current(svc.settings), name, svc.settings):
            return missing(name)
        return JSONResponse(report_body(name, prepared))

    @router.put("/adapters/{name:path}")
    async def upload(name: str, request: Request) -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        return await upload_route.put(svc, name, request)

    @router.delete("/adapters/{name:path}")
    async def delete(name: str, request: Request) -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        return await upload_route.delete(svc, name, request)

    return router


class SafeLoRARoutes:
    name = "safelora_routes"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())
        settings = state.settings()

        @app.middleware("http")
        async def retry_after(request, call_next):
            # vLLM's error responses carry no Retry-After; a 503 from the preparation
            # throttle (or vLLM's own queue) is a "come back shortly".
            response = await call_next(request)
            if response.status_code == 503 and "retry-after" not in response.headers:
                svc = state.service()
                response.headers["Retry-After"] = str(max(1, int(svc.retry_after_s())) if svc else 1)
            return response

        # Added last, so it runs first: no route, and no other middleware of ours, sees an unauthenticated request.
        auth.install(app, settings)

    async def init_state(self, engine_client, app_state, args: Namespace) -> None:
        return None
