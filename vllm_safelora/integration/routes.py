"""``vllm.endpoint_plugins`` entry point ``safelora_routes``: the audit API on vLLM's own port.

GET /safelora/v1/status               bank, device, policy, cache
GET /safelora/v1/adapters             every adapter this server prepared, with its summary
GET /safelora/v1/adapters/{name}      one adapter's full report (per-module cosines, hashes)

vLLM loads endpoint plugins only when VLLM_PLUGINS names them
(``VLLM_PLUGINS=safelora,safelora_routes``; ``vllm-safelora serve`` sets it).
"""

from __future__ import annotations

from argparse import Namespace

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from ..policies.tenant_rules import describe_rules
from . import state

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
        return JSONResponse(
            {
                name: {"cache_entry": p.digest, **p.report.summary.model_dump(mode="json")}
                for name, p in sorted(svc.loaded().items())
            }
        )

    @router.get("/adapters/{name:path}")
    async def adapter_report(name: str) -> JSONResponse:
        svc = state.service()
        if svc is None:
            return _unavailable()
        prepared = svc.loaded().get(name)
        if prepared is None:
            return JSONResponse({"error": f"adapter '{name}' has not been loaded by this server"}, status_code=404)
        body = prepared.report.model_dump(mode="json")
        body["served_as"] = name
        body["cache_entry"] = prepared.digest
        return JSONResponse(body)

    return router


class SafeLoRARoutes:
    name = "safelora_routes"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())

        @app.middleware("http")
        async def retry_after(request, call_next):
            # vLLM's error responses carry no Retry-After; a 503 from the preparation
            # throttle (or vLLM's own queue) is a "come back shortly".
            response = await call_next(request)
            if response.status_code == 503 and "retry-after" not in response.headers:
                svc = state.service()
                response.headers["Retry-After"] = str(max(1, int(svc.retry_after_s())) if svc else 1)
            return response

    async def init_state(self, engine_client, app_state, args: Namespace) -> None:
        return None
