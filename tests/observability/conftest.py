"""Fixtures of the observability tests: the Prometheus tools, skipped with the reason when absent."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's prometheus package (`apt-get install prometheus`, which "
                    ".ci/setup-env does where apt-get is available) to test the alert rules")
    return path
