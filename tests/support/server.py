"""The one server harness of the tests and benchmarks: environment, vLLM arguments, servers.

A server is a :class:`vllm_safelora.launcher.ServerProcess` (its own session, whole tree ended
on ``stop()``, HTTP helpers, ``metrics()`` parsed by ``prometheus_client``); this module adds
what only tests and benchmarks want: a clean, offline, quiet environment, the tiny model's
vLLM arguments, a name and a completion helper, starting several servers at once.

Imported as ``support.server`` (pytest puts ``tests/`` on ``sys.path``; so does
``benchmarks/_common.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping, Sequence

from vllm_safelora.launcher import (
    Metrics,
    ServerProcess,
    free_port,
    plugin_environment,
    run_to_exit,
    server_command,
)

__all__ = [
    "MAX_LORA_RANK",
    "PROMPT_TEXT",
    "START_TIMEOUT_S",
    "Metrics",
    "Server",
    "api_server_cmd",
    "baseline_env",
    "clean_env",
    "free_port",
    "new_server",
    "plugin_env",
    "run_startups",
    "run_to_exit",
    "served",
    "server_args",
    "start_all",
    "write_config",
]

MAX_LORA_RANK = 8
PROMPT_TEXT = "Hello, the safety rule is"
START_TIMEOUT_S = float(os.environ.get("SAFELORA_E2E_START_TIMEOUT", "300"))
# Settings the environment of a test or benchmark server inherits from nowhere.
_NOT_INHERITED = ("VLLM_PLUGINS", "VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


# ----------------------------------------------------------------------------- environment


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without VLLM_SAFELORA_*, plugin or resolver settings; offline, quiet, 1 GiB KV cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SAFELORA_") and k not in _NOT_INHERITED}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def plugin_env(config: Path | None, **extra: str) -> dict[str, str]:
    """:func:`clean_env` + the plugin (``launcher.plugin_environment``: config, allow-list, runtime LoRA)."""
    env = plugin_environment(config, clean_env())
    env.update(extra)
    return env


def baseline_env(*plugins: str, runtime_lora: bool = False, **extra: str) -> dict[str, str]:
    """Plain vLLM: VLLM_PLUGINS is an allow-list, so naming only ``plugins`` (or 'none') excludes safelora."""
    env = clean_env(**extra)
    env["VLLM_PLUGINS"] = ",".join(plugins) if plugins else "none"
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return env


def write_config(path: Path, **doc) -> Path:
    """A plugin config file (YAML) with these top-level fields (paths written as strings)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in doc.items()}, sort_keys=False)
    )
    return path


# ----------------------------------------------------------------------------- servers


def server_args(
    model: Path | str, extra: Sequence[str] = (), *, max_loras: int = 2, max_num_seqs: int = 8
) -> list[str]:
    """vLLM arguments for the tiny test model (float32, 256 tokens, LoRA rank <= 8); ``extra`` last."""
    return [
        "--model",
        str(model),
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_LORA_RANK),
        "--max-loras",
        str(max_loras),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        str(max_num_seqs),
        *extra,
    ]


def api_server_cmd(model: Path | str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The full command line of such a server on ``port``."""
    return server_command([*server_args(model, extra), "--host", "127.0.0.1", "--port", str(port)])


@dataclass
class Server(ServerProcess):
    """A named :class:`ServerProcess` that dies with the test run; ``wait_ready`` reports the start-up."""

    name: str = "vllm"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> Server:
        super().wait_ready(timeout)
        print(f"\n[server] {self.name} up on {self.base_url} in {self.startup_s:.1f}s (log {self.log_path})")
        return self

    def complete(self, model: str, prompt=PROMPT_TEXT, max_tokens: int = 2, **extra):
        """POST /v1/completions, greedy; the ``requests`` response."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        return self.post("/v1/completions", json=body)


def new_server(
    name: str,
    model: Path | str,
    config: Path | None,
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    **args: int,
) -> Server:
    """A plugin-enabled server of the tiny model (not started); log and working directory in ``workdir``.
    ``args``: :func:`server_args`' keywords (``max_loras``, ``max_num_seqs``); ``headers``: sent by its
    readiness check and HTTP helpers (an operator's key on a server with authentication on)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return Server(
        args=server_args(model, extra_args, **args),
        env=plugin_env(config, **dict(env or {})),
        log_path=workdir / f"{name}.log",
        cwd=workdir,
        die_with_parent=True,
        name=name,
        headers=headers,
    )


def start_all(servers: Iterable[Server], timeout: float = START_TIMEOUT_S) -> list[Server]:
    """Launch several servers at once, then wait for each (their start-ups overlap); all stopped on failure."""
    servers = list(servers)
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


@contextlib.contextmanager
def served(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, *, timeout: float = 400.0, name: str = "vllm"
) -> Iterator[Server]:
    """A server (any vLLM arguments and environment) that is up; its whole tree ended on exit."""
    server = Server(args=list(args), env=dict(env), log_path=Path(log_path), die_with_parent=True, name=name)
    with server:
        server.wait_ready(timeout)
        yield server


def run_startups(
    model: Path | str,
    configs: Mapping[str, Path | None],
    workdir: Path,
    timeout: float,
    *,
    workers: int = 4,
    extra_args: Mapping[str, Sequence[str]] | None = None,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, tuple[int | None, str, float]]:
    """One plugin-enabled server per config, ``workers`` at a time, each run to its exit (for start-ups
    that must fail): ``{case: (exit code or None if still running after timeout, output, seconds)}``.
    ``extra_args`` / ``extra_env``: per case, more vLLM arguments / environment."""

    def run(case: str) -> tuple[str, tuple[int | None, str, float]]:
        t0 = time.monotonic()
        rc, out = run_to_exit(
            api_server_cmd(model, free_port(), (extra_args or {}).get(case, ())),
            plugin_env(configs[case], **(extra_env or {}).get(case, {})),
            Path(workdir) / f"{case}.log",
            timeout,
            cwd=Path(workdir),
        )
        return case, (rc, out, time.monotonic() - t0)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(run, configs))
