"""``vllm.general_plugins`` entry point ``safelora``.

vLLM runs ``register`` once in every process (API server, engine core,
workers, a model-inspection subprocess). It must be cheap, and it must raise on
any misconfiguration: vLLM stops the process when a plugin function raises,
which is what we want (fail closed), whereas a plugin that quietly did not
install would let unprojected adapters through.
"""

from __future__ import annotations

import logging
import os
import sys

from .logs import share_vllm_logging

logger = logging.getLogger("vllm_safelora")


def register() -> None:
    import vllm

    from ..bank import read_manifest
    from ..config import load_settings
    from ..errors import ConfigError, SafeLoRAError
    from . import patches, state
    from .compat import check_vllm_version

    share_vllm_logging()
    try:
        settings = load_settings()
        check_vllm_version(vllm.__version__, allow_untested=settings.allow_untested_vllm)
        if os.environ.get("VLLM_USE_RUST_FRONTEND", "0") not in ("", "0", "false", "False"):
            raise ConfigError(
                "VLLM_USE_RUST_FRONTEND replaces the Python front end that vllm-safelora guards; unset it"
            )
        _check_auth(settings)
        # Cheap in every process; the front end also verifies the tensors' hash at start.
        read_manifest(settings.bank)
        state.set_settings(settings)
        patches.install()
        _register_resolver()
    except SafeLoRAError as exc:
        logger.error("vllm-safelora: refusing to start, adapters would not be protected: %s", exc)
        raise


def _check_auth(settings) -> None:
    """Authentication lives in the routes plugin's middleware: with it on, a server that would not
    load that plugin, or that also has vLLM's own key, must not start."""
    from ..errors import ConfigError
    from .auth import refuse_vllm_api_key

    if not settings.auth.enabled:
        return
    # The API server's own command line: caught here, before the model loads, not only when the app is built.
    refuse_vllm_api_key(settings, any(a == "--api-key" or a.startswith("--api-key=") for a in sys.argv))
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "safelora_routes" not in [p.strip() for p in plugins.split(",")]:
        raise ConfigError(
            f"auth.enabled needs the routes plugin, which checks every request's key, but VLLM_PLUGINS={plugins!r} "
            "leaves it out: add safelora_routes (vllm-safelora serve does)"
        )
    if not settings.auth.keys_file.is_file():
        raise ConfigError(
            f"auth.keys_file {settings.auth.keys_file} does not exist: create it with "
            "`vllm-safelora issue-key --admin NAME --keys-file FILE`"
        )


def _register_resolver() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from .resolver import RESOLVER_NAME, SafeLoRAResolver

    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, SafeLoRAResolver())
    # Ours first, so our sources and errors win; anything another resolver
    # returns still goes through the add_lora wrapper and is projected.
    resolvers = LoRAResolverRegistry.resolvers
    ordered = {RESOLVER_NAME: resolvers.pop(RESOLVER_NAME), **resolvers}
    resolvers.clear()
    resolvers.update(ordered)
