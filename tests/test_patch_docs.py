"""Every wrapper in integration/patches.py starts by saying what vLLM does there, why we wrap it,
and which entry of integration/hooks.py pins the vLLM code it relies on (so qualify checks it)."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_safelora
from vllm_safelora.integration.hooks import HOOKS

PATCHES = Path(vllm_safelora.__file__).parent / "integration" / "patches.py"


def wrappers() -> dict[str, str | None]:
    tree = ast.parse(PATCHES.read_text(encoding="utf-8"))
    return {
        n.name: ast.get_docstring(n)
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("_wrap_")
    }


def test_there_are_wrappers_to_check():
    assert len(wrappers()) >= 8


def test_each_wrapper_opens_with_what_why_and_its_hook():
    keys = {hook.key for hook in HOOKS}
    problems = []
    for name, doc in wrappers().items():
        lines = (doc or "").splitlines()[:3]
        if len(lines) < 3 or not (
            lines[0].startswith("vLLM: ") and lines[1].startswith("Why: ") and lines[2].startswith("Hook: ``")
        ):
            problems.append(f"{name}: the first three lines must be 'vLLM: ...', 'Why: ...', 'Hook: ``key``'")
            continue
        key = lines[2].split("``")[1]
        if key not in keys:
            problems.append(f"{name}: hook key {key!r} is not in integration/hooks.py")
    assert problems == []
