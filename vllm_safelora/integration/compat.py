"""The vLLM versions this plugin was tested against.

The plugin wraps vLLM internals (InputProcessor, engine add_lora, the LoRA
worker manager). Their names and signatures change between releases, so an
untested version is refused rather than half-patched.
"""

from __future__ import annotations

from ..errors import ConfigError

TESTED_VLLM_VERSIONS = ("0.32.0",)


def check_vllm_version(version: str, *, allow_untested: bool) -> None:
    if version in TESTED_VLLM_VERSIONS:
        return
    message = (
        f"vllm-safelora was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, this is vLLM {version}. "
        "It patches vLLM internals that change between releases; install a tested vLLM "
        "(pip install 'vllm-safelora[cpu]' or '[gpu]'), or set VLLM_SAFELORA_ALLOW_UNTESTED_VLLM=true "
        "at your own risk"
    )
    if not allow_untested:
        raise ConfigError(message)
    import logging

    logging.getLogger("vllm_safelora").warning("UNTESTED vLLM VERSION: %s", message)
