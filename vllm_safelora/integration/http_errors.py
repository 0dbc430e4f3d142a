"""How refusals reach HTTP clients: AdapterRefused -> a 4xx, Overloaded -> 503, as vLLM's GracefulHTTPError;
and the 503 for a LoRA request that arrives before the plugin's service started."""

from __future__ import annotations

from http import HTTPStatus

from ..errors import AdapterRefused, Overloaded, RefusalReason

_STATUS = {
    RefusalReason.NOT_FOUND: HTTPStatus.NOT_FOUND,
    RefusalReason.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    RefusalReason.ADMISSION: HTTPStatus.FORBIDDEN,
    RefusalReason.NAME_IN_USE: HTTPStatus.CONFLICT,
}


def http_status(exc: AdapterRefused | Overloaded) -> HTTPStatus:
    if isinstance(exc, Overloaded):
        # Like vLLM's own queue overflow: load balancers and SDKs retry on 503.
        return HTTPStatus.SERVICE_UNAVAILABLE
    return _STATUS.get(exc.reason, HTTPStatus.BAD_REQUEST)


def to_http_error(exc: AdapterRefused | Overloaded):
    """vLLM keeps a GracefulHTTPError's status and message on every path we raise from."""
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(f"vllm-safelora: {exc}", http_status(exc))


def service_not_started():
    """A LoRA request before the service started (a 503): never load an unprojected adapter."""
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(
        "vllm-safelora: LoRA request before the plugin's service started; refusing to load an unprojected adapter",
        HTTPStatus.SERVICE_UNAVAILABLE,
    )


def to_error_response(exc: AdapterRefused | Overloaded):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(to_http_error(exc))


def entry_changed_mid_request(name: str):
    """A request whose cache entry the worker found altered (and removed) after it started: a 503,
    because the next request is served from the entry rebuilt from the upload."""
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(
        f"vllm-safelora: adapter '{name}': its cache entry changed on disk while this request ran, so the request "
        "was stopped rather than answered without the adapter; retry (the entry is rebuilt from the upload)",
        HTTPStatus.SERVICE_UNAVAILABLE,
    )
