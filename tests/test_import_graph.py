"""No import cycles inside vllm_safelora, and every module imports.

The graph has an edge A -> B for every ``import``/``from ... import`` in A's source
that names module B of the package (or a name in B), wherever the statement is:
module level, under ``if TYPE_CHECKING:``, or inside a function. A lazy import
does not make a cycle harmless to a reader, so it counts too. A submodule's
implicit import of its parent package is not an edge (``bank.build`` importing
``bank.manifest`` does not depend on ``bank/__init__``); ``from pkg import sub``
is an edge to ``pkg.sub`` only.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import vllm_safelora

PACKAGE = "vllm_safelora"


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (directory ``root``) by dotted name -> source file."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        anchor = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = (
                    importlib.util.resolve_name("." * node.level + (node.module or ""), anchor)
                    if node.level
                    else node.module
                )
                for alias in node.names:  # a submodule (from . import state) or a name in ``base``
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == WHITE and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE and (found := visit(start)):
            return found
    return None


ROOT = Path(vllm_safelora.__file__).parent
MODULES = package_modules(ROOT, PACKAGE)


def test_the_walker_sees_the_whole_package():
    found = {info.name for info in pkgutil.walk_packages(vllm_safelora.__path__, f"{PACKAGE}.")}
    assert set(MODULES) == found | {PACKAGE}
    assert {
        "vllm_safelora.config",
        "vllm_safelora.policies.tenant_rules",
        "vllm_safelora.bank.load",
        "vllm_safelora.integration.patches",
        "vllm_safelora.integration.plugin",
    } <= set(MODULES)


def test_the_walker_finds_edges_and_cycles(tmp_path):
    pkg = tmp_path / "cyc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n")
    graph = import_graph(package_modules(pkg, "cyc"))
    assert graph["cyc.a"] == {"cyc.b"}
    assert graph["cyc.b"] == {"cyc.sub.c"}
    assert graph["cyc.sub.c"] == {"cyc.a"}
    assert find_cycle(graph) == ["cyc.a", "cyc.b", "cyc.sub.c", "cyc.a"]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package_modules(pkg, "cyc"))) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    importlib.import_module(module)


# What a person runs: these may sit at the root whoever imports them.
ENTRY_MODULES = {f"{PACKAGE}.cli", f"{PACKAGE}.demo", f"{PACKAGE}.doctor"}
MAX_ROOT_MODULES = 12


def root_modules() -> set[str]:
    return {m for m, path in MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"}


def test_the_root_shows_the_stages_not_their_helpers():
    """A root module used by one other module belongs in that module's folder."""
    graph = import_graph(MODULES)
    importers = {m: {src for src, targets in graph.items() if m in targets} for m in root_modules()}
    helpers = {m: sorted(users) for m, users in importers.items() if m not in ENTRY_MODULES and len(users) <= 1}
    assert helpers == {}, f"root modules imported by one module only (move them beside it): {helpers}"
    assert len(root_modules()) <= MAX_ROOT_MODULES, sorted(root_modules())


def test_one_errors_module():
    names = [path for path in MODULES.values() if path.name == "errors.py"]
    assert len(names) == 1, names
