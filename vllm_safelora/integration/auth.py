"""Authentication on every route of vLLM's port: who the caller is, and which routes it may call.

A pure ASGI middleware (no body buffering) that runs before every route, vLLM's and ours
alike: vLLM's own ``--api-key`` check guards only the /v1, /v2, /inference and /cohere
prefixes, so it cannot be the guard here and must be unset. The identity it finds is put
in a context variable that the request's handler and the engine hooks inherit; which
adapters an identity may use is decided where vLLM resolves a model name (patches.py).

Routes are closed by default: a tenant may call the generation routes, /v1/models and
its adapters under /safelora/v1/adapters; everything else (load and unload, /metrics,
/safelora/v1/status, vLLM's other routes) needs an operator key.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import os
import re

from ..config import SafeLoRASettings
from ..errors import ConfigError
from ..serving.access import OPEN
from ..serving.credentials import NAME_RE, Identity, KeyStore
from ..sources.names import shown_name

logger = logging.getLogger("vllm_safelora")

_caller: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("safelora_caller", default=None)

# (method, path regex) a tenant may call; the handlers narrow what each one shows.
_TENANT_ROUTES = [
    (("POST",), re.compile(r"/v1/(completions|chat/completions|embeddings)")),
    (("GET",), re.compile(r"/v1/models")),
    (("GET",), re.compile(r"/(health|ping|version)")),
    (("GET",), re.compile(r"/safelora/v1/adapters")),
    (("GET", "PUT", "DELETE"), re.compile(r"/safelora/v1/adapters/.+")),
]
_UNAUTHORIZED = {
    "error": {
        "message": "a valid API key is required (Authorization: Bearer <key>)",
        "type": "AuthenticationError",
        "param": None,
        "code": 401,
    }
}


def caller() -> Identity | None:
    """The identity of the request being handled; ``OPEN`` when authentication is off, None outside a request."""
    return _caller.get()


def current(settings: SafeLoRASettings) -> Identity:
    """The caller, failing closed: with authentication on, code that runs outside a request the
    middleware saw (which should not happen) is treated as no tenant at all."""
    found = _caller.get()
    if found is not None:
        return found
    return Identity(role="tenant", name="", via="none") if settings.auth.enabled else OPEN


def tenant_may_call(method: str, path: str) -> bool:
    return any(method in methods and rx.fullmatch(path) for methods, rx in _TENANT_ROUTES)


def refuse_vllm_api_key(settings: SafeLoRASettings, api_key) -> None:
    """With the plugin's authentication on, vLLM's single --api-key must be unset: it would be one
    more key every tenant shares, and it guards only some prefixes."""
    if settings.auth.enabled and (api_key or os.environ.get("VLLM_API_KEY")):
        raise ConfigError(
            "auth.enabled and vLLM's --api-key (or VLLM_API_KEY) are both set: unset vLLM's key. The plugin checks "
            "every route with per-tenant keys, and the operator's key (issue-key --admin) replaces vLLM's"
        )


class _Proxies:
    def __init__(self, entries):
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def trusts(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in n for n in self.networks)


class AuthMiddleware:
    def __init__(self, app, settings: SafeLoRASettings, keys: KeyStore):
        self.app = app
        self.keys = keys
        self.proxies = _Proxies(settings.auth.trusted_proxies)
        header = settings.auth.tenant_header
        self.tenant_header = header.lower().encode() if header else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope.get("method", "GET")
        identity, problem = self._identify(scope)
        refused = identity is None or (not identity.admin and not tenant_may_call(method, path))
        if refused and scope["type"] == "websocket":  # no HTTP answer on a websocket: close it (policy violation)
            return await send({"type": "websocket.close", "code": 1008})
        if identity is None:
            return await _json(
                send,
                401,
                _UNAUTHORIZED
                if problem is None
                else {**_UNAUTHORIZED, "error": {**_UNAUTHORIZED["error"], "message": problem}},
            )
        if refused:
            return await _json(
                send,
                403,
                {
                    "error": {
                        "message": f"{method} {path[:100]} needs the operator's key",
                        "type": "PermissionDeniedError",
                        "param": None,
                        "code": 403,
                    }
                },
            )
        token = _caller.set(identity)
        try:
            return await self.app(scope, receive, send)
        finally:
            _caller.reset(token)

    def _identify(self, scope) -> tuple[Identity | None, str | None]:
        headers = scope.get("headers") or []
        if self.tenant_header is not None:
            values = [v for k, v in headers if k == self.tenant_header]
            if values:
                peer = (scope.get("client") or (None,))[0]
                if not self.proxies.trusts(peer):
                    logger.warning(
                        "vllm-safelora: tenant header from %s, which is not in auth.trusted_proxies: refused", peer
                    )
                    return None, "the tenant header is accepted only from the configured proxies"
                tenant = values[0].decode("latin-1")
                if len(values) > 1 or not NAME_RE.fullmatch(tenant) or ".." in tenant:
                    logger.warning("vllm-safelora: proxy %s sent an invalid tenant header %s", peer, shown_name(tenant))
                    return None, "the tenant header does not name one tenant"
                return Identity(role="tenant", name=tenant, via="header"), None
        auth = [v for k, v in headers if k == b"authorization"]
        if len(auth) != 1:
            return None, None
        scheme, _, key = auth[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None, None
        return self.keys.identify(key.strip()), None


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def install(app, settings: SafeLoRASettings) -> None:
    """Put the middleware in front of every route, or say once that there is none."""
    args = getattr(app.state, "args", None)
    refuse_vllm_api_key(settings, getattr(args, "api_key", None))
    if not settings.auth.enabled:
        logger.info(
            "vllm-safelora: authentication is off (auth.enabled: false): every client may use, list and read the "
            "report of every adapter; enable it for more than one tenant"
        )
        return
    keys = KeyStore(settings.auth.keys_file)
    if not any(e.role == "admin" for e in keys.entries().values()):
        logger.warning(
            "vllm-safelora: keys file %s holds no operator key: load/unload, /metrics and /safelora/v1/status are "
            "closed to everyone (vllm-safelora issue-key --admin NAME)",
            settings.auth.keys_file,
        )
    app.add_middleware(AuthMiddleware, settings=settings, keys=keys)
    logger.info(
        "vllm-safelora: authentication on: every route needs a key from %s%s",
        settings.auth.keys_file,
        f" or header {settings.auth.tenant_header} from {settings.auth.trusted_proxies}"
        if settings.auth.tenant_header
        else "",
    )
