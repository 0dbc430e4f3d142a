"""Fixtures of the observability tests: the Prometheus tools, skipped with the reason when absent."""

from __future__ import annotations

import pytest

from observability_support import tool_or_skip


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool_or_skip("promtool", "to test the alert rules")
