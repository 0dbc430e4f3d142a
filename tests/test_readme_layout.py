"""The README's Layout section lists exactly the modules of vllm_safelora/, each with its job.

A sub-package's ``__init__.py`` is covered by the package's own line (``bank/ ...``);
every other ``.py`` file must have a line (name, then its job), and every listed file must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import vllm_safelora

PACKAGE_DIR = Path(vllm_safelora.__file__).parent
README = PACKAGE_DIR.parent / "README.md"


def listed_paths(readme: str) -> dict[str, str]:
    """{path relative to vllm_safelora/: its job} from the Layout section's code block."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    lines = block.splitlines()
    assert lines[0] == "vllm_safelora/", lines[0]
    listed: dict[str, str] = {}
    parents: list[str] = []  # the directory at each indentation depth
    for line in lines[1:]:
        match = re.fullmatch(r"( +)(\S+)\s+(\S.*)", line)
        assert match, f"a Layout line must be '<indent><name>  <job>': {line!r}"
        depth = len(match[1]) // 2 - 1
        name, job = match[2], match[3]
        parents = parents[:depth]
        path = "/".join([*parents, name.rstrip("/")])
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
            path += "/__init__.py"
        listed[path] = job
    return listed


def test_readme_layout_matches_the_tree():
    listed = listed_paths(README.read_text(encoding="utf-8"))
    on_disk = {p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py")}
    assert sorted(on_disk - set(listed)) == [], "modules missing from README.md's Layout section"
    assert sorted(set(listed) - on_disk) == [], "README.md's Layout section lists files that do not exist"
