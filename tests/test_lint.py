"""The code lints clean and is formatted: ``ruff check`` (rules in pyproject.toml's ``[tool.ruff]``) finds nothing and ``ruff format --check`` changes nothing.

Covers every Python file of the package, the tests and the benchmarks. Ruff comes with
the ``test`` extra; where it is not installed the test is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import re
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
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"ruff check {' '.join(LINTED)} found problems:\n{result.stdout}{result.stderr}"


ISSUE_REFERENCE = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
# vLLM's and other projects' trackers may be cited with their repository named.
FOREIGN_TRACKER = re.compile(r"(vllm|sglang|peft|transformers|lorax|safetensors)[^\n]{0,40}\bissues?\b", re.IGNORECASE)


def test_code_and_tests_say_the_behaviour_not_an_issue_number():
    """A comment or docstring citing a tracker number means nothing to a reader of the repository."""
    found = []
    for top in LINTED:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix not in (".py", ".md", ".yaml", ".yml") or "results" in path.parts:
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if ISSUE_REFERENCE.search(line) and not FOREIGN_TRACKER.search(line):
                    found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()[:120]}")
    assert found == [], "say the behaviour instead of citing an issue number:\n" + "\n".join(found)


def test_ruff_format_has_nothing_to_change():
    ruff = ruff_command()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it); the format check did not run")
    result = subprocess.run(
        [*ruff, "format", "--check", "--no-cache", *LINTED], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"ruff format would change files (run `ruff format {' '.join(LINTED)}`):\n{result.stdout}{result.stderr}"
    )
