"""The code lints clean: ``ruff check`` (rules in pyproject.toml's ``[tool.ruff]``) finds nothing.

Covers every Python file of the package, the tests and the benchmarks. Ruff comes with
the ``test`` extra; where it is not installed the test is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINTED = ("vllm_safelora", "tests", "benchmarks")


def ruff_command() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_finds_nothing():
    ruff = ruff_command()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it); the lint check did not run")
    result = subprocess.run(
        [*ruff, "check", "--no-cache", "--output-format", "concise", *LINTED],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"ruff check {' '.join(LINTED)} found problems:\n{result.stdout}{result.stderr}"
