"""Answers the audit routes and the upload route share: one body for "not there", one for a report."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def missing(name: str) -> JSONResponse:
    """The one answer for an adapter that is not there, or that the caller may not see."""
    return JSONResponse({"error": f"adapter '{name}' has not been loaded by this server"}, status_code=404)


def report_body(name: str, prepared) -> dict:
    body = prepared.report.model_dump(mode="json")
    body["served_as"] = name
    body["cache_entry"] = prepared.digest
    return body
