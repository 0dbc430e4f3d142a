"""How refusals reach HTTP clients: AdapterRefused -> vLLM's GracefulHTTPError with a 4xx."""

from __future__ import annotations

from http import HTTPStatus

from ..errors import AdapterRefused, RefusalReason

_STATUS = {
    RefusalReason.NOT_FOUND: HTTPStatus.NOT_FOUND,
    RefusalReason.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    RefusalReason.ADMISSION: HTTPStatus.FORBIDDEN,
}


def http_status(exc: AdapterRefused) -> HTTPStatus:
    return _STATUS.get(exc.reason, HTTPStatus.BAD_REQUEST)


def to_http_error(exc: AdapterRefused):
    """vLLM keeps a GracefulHTTPError's status and message on every path we raise from."""
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(f"vllm-safelora: {exc}", http_status(exc))


def to_error_response(exc: AdapterRefused):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(to_http_error(exc))
