"""Scale: per-adapter cost and resources as the number N of distinct adapters grows.

Two parts, one process run:

* **service** (no vLLM): ``SafeLoRAService.start(...)`` in this process, then N distinct
  tiny adapters (default 100,000), each written just before it is prepared and deleted
  right after (only its cache entry stays; the cache is bounded by ``--budget-mb``). Per
  adapter: ``svc.prepare(name)`` + ``svc.mark_loaded(name, prepared)``, timed by wall
  clock and by this thread's CPU time (``time.thread_time()``: robust against the other
  jobs of a shared machine). Every ``N/200`` adapters: open fds (``/proc/self/fd``), RSS,
  cache bytes and entries (from the cache's index), the service's tracked maps and leases.
  Windows of ``--window`` (200) prepares around N = 1k, 10k, 50k, 100k give the medians the
  headline compares (latency at 100k over latency at 1k; goal <= 1.2).

* **live** (vLLM's OpenAI server, ``--max-loras 2``, runtime LoRA updating on): every
  request (1 token) names a new adapter, ``--live-n`` of them (default 3,000), for plain vLLM's
  filesystem resolver (``VLLM_PLUGINS=lora_filesystem_resolver``,
  ``VLLM_LORA_RESOLVER_CACHE_DIR``) and for the plugin (``adapter_dirs`` on the same
  directory, cache budget ``--live-budget-mb``), one server after the other, on the same
  adapters. Client-side latency per request; every ``N/100`` requests: open fds, RSS and
  CPU seconds of the server's whole process tree (API server, engine core), and a
  base-model request (the floor).

Adapters are rank 8 on all 7 linear modules of the tiny Llama (``vllm_safelora.tiny``):
the config of one PEFT adapter made by ``make_tiny_adapter`` with new Gaussian weights per
adapter (distinct content, low cosine with the alignment subspace, so they are projected;
the outcomes are counted).

    python benchmarks/scale.py                  # 100k service + 3k live per side: about 60-90 min on 2 shared cores
    python benchmarks/scale.py --quick          # 3k service + 300 live per side: about 5 min
    python benchmarks/scale.py --skip-live      # service part only
    python benchmarks/scale.py --plot-only benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    SHARED_NOTE,
    baseline_env,
    check_plugin_state,
    fmt,
    machine_info,
    median,
    now_iso,
    plugin_env,
    print_table,
    save_json,
    served,
    server_args,
    write_safelora_config,
)

PROMPT = "Hello, the safety rule is"
CHECKPOINTS = (1_000, 10_000, 50_000, 100_000)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- adapters


class AdapterFactory:
    """Distinct valid adapters from one PEFT template: same config, new Gaussian weights per seed."""

    def __init__(self, template: Path):
        from safetensors.torch import load_file

        self.config_bytes = (template / CONFIG_FILE).read_bytes()
        tensors = load_file(str(template / WEIGHTS_FILE))
        self.names = sorted(tensors)
        self.shapes = [tuple(tensors[k].shape) for k in self.names]
        self.stds = [float(tensors[k].float().std()) or 0.02 for k in self.names]
        self.dtypes = [tensors[k].dtype for k in self.names]

    def write(self, out: Path, seed: int) -> Path:
        import torch
        from safetensors.torch import save

        g = torch.Generator().manual_seed(1_000_003 + seed)
        tensors = {
            k: (torch.randn(shape, generator=g) * std).to(dtype)
            for k, shape, std, dtype in zip(self.names, self.shapes, self.stds, self.dtypes)
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_bytes(self.config_bytes)
        (out / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        return out


def make_world(work: Path, modules: list[str]) -> dict:
    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import make_tiny_adapter, make_tiny_models

    models = make_tiny_models(work / "models")
    template = make_tiny_adapter(
        models.aligned, work / "template", seed=7, direction="orthogonal", base_dir=models.base, target_modules=modules
    )
    bank = work / "bank"
    build_bank(str(models.base), str(models.aligned), bank, overwrite=True, progress=None)
    return {"models": models, "template": template, "bank": bank, "factory": AdapterFactory(template)}


# ----------------------------------------------------------------------------- resources


def self_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def self_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def tree_stats(pid: int) -> dict:
    """fds, RSS and CPU seconds of ``pid`` and all its descendants (the server's process tree)."""
    import psutil

    out = {"procs": 0, "fds": 0, "rss": 0, "cpu_s": 0.0, "per_proc": []}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            with p.oneshot():
                fds, rss, ct = p.num_fds(), p.memory_info().rss, p.cpu_times()
                name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out["procs"] += 1
        out["fds"] += fds
        out["rss"] += rss
        out["cpu_s"] += ct.user + ct.system
        out["per_proc"].append({"pid": p.pid, "name": name, "fds": fds, "rss": rss, "cpu_s": ct.user + ct.system})
    return out


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def window(values, center: int, width: int, n: int) -> list[float]:
    lo = max(0, min(center - width // 2, n - width))
    return list(values[lo : min(n, lo + width)])


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bins(values, n: int, size: int) -> list[dict]:
    out = []
    for lo in range(0, n, size):
        xs = list(values[lo : min(n, lo + size)])
        out.append({"n": lo + len(xs), "median": median(xs), "p90": quantile(xs, 0.9)})
    return out


# ----------------------------------------------------------------------------- service part


def run_service(world: dict, work: Path, a) -> dict:
    from tqdm import tqdm

    from vllm_safelora.config import SafeLoRASettings
    from vllm_safelora.serving.service import SafeLoRAService

    n = a.service_n
    root = work / "svc-adapters"
    root.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "svc-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    budget = int(a.budget_mb * 2**20)
    settings = SafeLoRASettings(
        bank=world["bank"], adapter_dirs=[root], cache_dir=cache_dir, device="cpu", cache_max_bytes=budget
    )
    t0 = time.perf_counter()
    svc = SafeLoRAService.start(settings, str(world["models"].aligned))
    start_s = time.perf_counter() - t0
    factory: AdapterFactory = world["factory"]
    # one warm-up adapter outside the measurements (first projection, imports, SQLite pages)
    for w in range(3):
        name = f"warmup{w}"
        factory.write(root / name, seed=-1 - w)
        svc.mark_loaded(name, svc.prepare(name))
        shutil.rmtree(root / name)
    wall, cpu, gen = array("d"), array("d"), array("d")
    outcomes: dict[str, int] = {}
    hits = 0
    samples: list[dict] = []
    every = max(1, n // 200)
    ckpt_du: dict[int, int] = {}
    checkpoints = sorted({c for c in CHECKPOINTS if c <= n} | {n})

    def sample(i: int) -> None:
        st = svc.cache.stats()
        samples.append(
            {
                "n": i,
                "fds": self_fds(),
                "rss": self_rss(),
                "cache_bytes": st.nbytes,
                "cache_entries": st.entries,
                "index_file_bytes": st.file_bytes,
                "leases": st.leases,
                **{f"tracking_{k}": v for k, v in svc.tracking().items()},
                "t": time.perf_counter() - t_loop,
            }
        )

    t_loop = time.perf_counter()
    sample(0)
    for i in tqdm(range(n), desc="service prepares", unit="adapter", mininterval=5, smoothing=0.05):
        name = f"t{i % 97}/a{i}"  # 97 tenant directories
        tg = time.perf_counter()
        factory.write(root / name, seed=i)
        w0, c0 = time.perf_counter(), time.thread_time()
        prepared = svc.prepare(name)
        svc.mark_loaded(name, prepared)
        c1, w1 = time.thread_time(), time.perf_counter()
        shutil.rmtree(root / name)
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
        gen.append(w0 - tg)
        o = prepared.report.summary.outcome
        outcomes[o] = outcomes.get(o, 0) + 1
        hits += bool(prepared.cache_hit)
        svc.drain_dropped_names()
        if (i + 1) % every == 0 or i + 1 == n:
            sample(i + 1)
        if a.partial_every and (i + 1) % a.partial_every == 0 and i + 1 < n:
            # progress on disk, so that an interrupted long run still shows the trend
            save_json(
                a.partial_path,
                {
                    "benchmark": "scale",
                    "partial": True,
                    "service": {
                        "n_done": i + 1,
                        "samples": samples,
                        "budget_bytes": budget,
                        "bins": {"size": every, "wall": bins(wall, i + 1, every), "cpu": bins(cpu, i + 1, every)},
                    },
                },
            )
        if i + 1 in checkpoints:
            ckpt_du[i + 1] = (
                dir_bytes(cache_dir / "entries") if (cache_dir / "entries").is_dir() else dir_bytes(cache_dir)
            )
    loop_s = time.perf_counter() - t_loop
    cache_du_end = dir_bytes(cache_dir)
    svc.cache.close()

    return {
        "n": n,
        "window": a.window,
        "budget_bytes": budget,
        "service_start_s": start_s,
        "loop_s": loop_s,
        "outcomes": outcomes,
        "cache_hits": hits,
        "gen_ms_median": median(gen) * 1e3,
        "max_tracked_adapters": settings.max_tracked_adapters,
        **summarize_service(wall, cpu, samples, checkpoints, ckpt_du, budget, a.window),
        "cache_dir_bytes_du_end": cache_du_end,
    }


def summarize_service(
    wall, cpu, samples: list[dict], checkpoints: list[int], ckpt_du: dict, budget: int, width: int
) -> dict:
    """Median windows around each checkpoint, the headline, and binned series for the plot."""
    n = len(wall)
    windows = {}
    for c in checkpoints:
        ww, cc = window(wall, c, width, n), window(cpu, c, width, n)
        s_at = min(samples, key=lambda s: abs(s["n"] - c))
        windows[str(c)] = {
            "wall_ms_median": median(ww) * 1e3,
            "wall_ms_p90": quantile(ww, 0.9) * 1e3,
            "cpu_ms_median": median(cc) * 1e3,
            "cpu_ms_p90": quantile(cc, 0.9) * 1e3,
            "prepares": len(ww),
            "fds": s_at["fds"],
            "rss_mib": s_at["rss"] / 2**20,
            "cache_bytes": s_at["cache_bytes"],
            "cache_entries": s_at["cache_entries"],
            "entries_dir_bytes_du": ckpt_du.get(c),
            "sampled_at_n": s_at["n"],
        }
    first, last = str(checkpoints[0]), str(checkpoints[-1])
    after_warm = [s for s in samples if s["n"] >= checkpoints[0]]
    headline = {
        "n_first": checkpoints[0],
        "n_last": checkpoints[-1],
        "wall_ratio_last_over_first": windows[last]["wall_ms_median"] / windows[first]["wall_ms_median"],
        "cpu_ratio_last_over_first": windows[last]["cpu_ms_median"] / windows[first]["cpu_ms_median"],
        "fds_by_n": {c: windows[c]["fds"] for c in windows},
        "fds_min_max_after_first": [min(s["fds"] for s in after_warm), max(s["fds"] for s in after_warm)],
        "rss_mib_first": windows[first]["rss_mib"],
        "rss_mib_last": windows[last]["rss_mib"],
        "rss_growth_mib": windows[last]["rss_mib"] - windows[first]["rss_mib"],
        "rss_mib_max": max(s["rss"] for s in samples) / 2**20,
        "cache_bytes_max": max(s["cache_bytes"] for s in samples),
        "cache_budget_bytes": budget,
        "cache_bytes_max_over_budget": max(s["cache_bytes"] for s in samples) / budget,
    }
    size = max(1, n // 200)
    b_wall, b_cpu = bins(wall, n, size), bins(cpu, n, size)
    # least-squares slope of the binned medians over N >= the first checkpoint: the growth per 1k adapters
    for key, bs in (("wall", b_wall), ("cpu", b_cpu)):
        pts = [(b["n"], b["median"]) for b in bs if b["n"] >= checkpoints[0] and b["median"] is not None]
        if len(pts) >= 3:
            mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
            slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
            headline[f"{key}_slope_ms_per_10k_adapters"] = slope * 1e4 * 1e3
    return {
        "checkpoints": checkpoints,
        "windows": windows,
        "headline": headline,
        "samples": samples,
        "bins": {"size": size, "wall": b_wall, "cpu": b_cpu},
    }


# ----------------------------------------------------------------------------- live part


def live_side(side: str, world: dict, root: Path, names: list[str], work: Path, a) -> dict:
    import requests
    from tqdm import tqdm

    model = str(world["models"].aligned)
    args = server_args(model, max_loras=2, max_num_seqs=8)
    if side == "baseline":
        env = baseline_env("lora_filesystem_resolver", runtime_lora=True, VLLM_LORA_RESOLVER_CACHE_DIR=str(root))
    else:
        cache = work / "live-cache"
        shutil.rmtree(cache, ignore_errors=True)
        config = write_safelora_config(
            work / "live-safelora.yaml", bank=world["bank"], adapter_dirs=[root], cache_dir=cache
        )
        with open(config, "a") as f:
            f.write(f"cache_max_bytes: {int(a.live_budget_mb * 2**20)}\n")
        env = plugin_env(config)
    log = a.log_dir / f"live-{side}.log"
    n = len(names)
    every = max(1, n // 100)
    lat = array("d")
    samples: list[dict] = []
    errors: list[str] = []
    out: dict = {"side": side, "env_VLLM_PLUGINS": env.get("VLLM_PLUGINS"), "log": str(log)}
    with served(args, env, log) as server:
        out["startup_s"] = server.startup_s
        out["plugin_check"] = check_plugin_state(server, expect_plugin=(side == "plugin"))
        s = requests.Session()

        def complete(m: str) -> tuple[float, int, str]:
            t0 = time.perf_counter()
            r = s.post(
                f"{server.base_url}/v1/completions",
                json={"model": m, "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
                timeout=120,
            )
            return time.perf_counter() - t0, r.status_code, r.text[:200]

        for m in (model, model, model, "warmup", "warmup"):
            dt, code, text = complete(m)
            if code != 200:
                raise RuntimeError(f"[{side}] warm-up request for {m} failed: HTTP {code} {text}")
        pid = server.proc.pid

        def sample(i: int) -> None:
            st = tree_stats(pid)
            floor, code, _ = complete(model)
            samples.append(
                {
                    "n": i,
                    "fds": st["fds"],
                    "rss": st["rss"],
                    "cpu_s": st["cpu_s"],
                    "procs": st["procs"],
                    "per_proc": st["per_proc"],
                    "floor_s": floor if code == 200 else None,
                    "t": time.perf_counter() - t_loop,
                }
            )

        t_loop = time.perf_counter()
        sample(0)
        for i, name in enumerate(tqdm(names, desc=f"live {side}", unit="req", mininterval=5)):
            dt, code, text = complete(name)
            if code != 200:
                errors.append(f"{name}: HTTP {code} {text}")
                if len(errors) > max(10, n // 20):
                    raise RuntimeError(f"[{side}] too many failed requests; last: {errors[-1]}")
            lat.append(dt)
            if (i + 1) % every == 0 or i + 1 == n:
                sample(i + 1)
        out["loop_s"] = time.perf_counter() - t_loop
        if side == "plugin":
            metrics = server.metrics()
            out["plugin_metrics"] = {
                m: metrics.value(m)
                for m in (
                    "safelora_projections_total",
                    "safelora_projection_seconds_sum",
                    "safelora_cache_bytes",
                    "safelora_cache_max_bytes",
                )
            }
            r = server.get("/safelora/v1/status")
            if r.status_code == 200:
                out["plugin_status_end"] = r.json()
            out["cache_dir_bytes_du_end"] = dir_bytes(work / "live-cache")
    out["errors"] = errors
    out["latency_s"] = list(lat)
    out["samples"] = samples
    # per-window summaries (client latency and server CPU per request)
    marks = sorted({m for m in (100, 300, 1000, 3000, 10000) if m <= n} | {n})
    out["windows"] = {}
    for m in marks:
        w = window(lat, m, min(a.window, n), n)
        s0 = min(samples, key=lambda s: abs(s["n"] - max(0, m - min(a.window, n))))
        s1 = min(samples, key=lambda s: abs(s["n"] - m))
        cpu_per_req = (s1["cpu_s"] - s0["cpu_s"]) / max(1, s1["n"] - s0["n"]) if s1["n"] > s0["n"] else None
        floors = [s["floor_s"] for s in samples if s["floor_s"] is not None and s0["n"] <= s["n"] <= s1["n"]]
        out["windows"][str(m)] = {
            "latency_ms_median": median(w) * 1e3,
            "latency_ms_p90": quantile(w, 0.9) * 1e3,
            "server_cpu_ms_per_request": cpu_per_req * 1e3 if cpu_per_req is not None else None,
            "floor_ms_median": median(floors) * 1e3 if floors else None,
            "fds": s1["fds"],
            "rss_mib": s1["rss"] / 2**20,
            "sampled_at_n": s1["n"],
        }
    print(
        f"  [live {side}] up in {out['startup_s']:.0f}s, {n} requests in {out['loop_s']:.0f}s, "
        f"{len(errors)} errors; "
        + ", ".join(
            f"N={m}: {v['latency_ms_median']:.1f} ms, {v['fds']} fds, {v['rss_mib']:.0f} MiB"
            for m, v in out["windows"].items()
        )
    )
    return out


def run_live(world: dict, work: Path, a) -> dict:
    from tqdm import tqdm

    root = work / "live-adapters"
    root.mkdir(parents=True, exist_ok=True)
    factory: AdapterFactory = world["factory"]
    factory.write(root / "warmup", seed=-100)
    names = [f"live{i}" for i in range(a.live_n)]
    for i, name in enumerate(tqdm(names, desc="writing live adapters", unit="adapter", mininterval=5)):
        factory.write(root / name, seed=10_000_000 + i)
    out = {
        "n": a.live_n,
        "budget_bytes": int(a.live_budget_mb * 2**20),
        "adapters_dir_bytes": dir_bytes(root),
        "sides": {},
    }
    for side in ("baseline", "plugin"):
        out["sides"][side] = live_side(side, world, root, names, work, a)
    shutil.rmtree(root, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- report


def api_fds(live: dict, side: str, n: int) -> int | None:
    """Open fds of the API server process alone (the tree's root: where the plugin's service runs)."""
    for s in live["sides"][side]["samples"]:
        if s["n"] == n and s["per_proc"]:
            return s["per_proc"][0]["fds"]
    return None


def print_summary(result: dict) -> None:
    sv = result.get("service")
    if sv:
        print(
            f"\n== service (no vLLM): prepare + mark_loaded of N distinct adapters, medians of {sv['window']} "
            f"prepares around N; cache budget {sv['budget_bytes'] / 2**20:.0f} MiB =="
        )
        rows = [
            [
                c,
                fmt(w["wall_ms_median"], ".2f"),
                fmt(w["wall_ms_p90"], ".2f"),
                fmt(w["cpu_ms_median"], ".2f"),
                w["fds"],
                fmt(w["rss_mib"], ".0f"),
                fmt(w["cache_bytes"] / 2**20, ".1f"),
                w["cache_entries"],
            ]
            for c, w in sv["windows"].items()
        ]
        print_table(["N", "wall ms", "wall p90", "cpu ms", "fds", "RSS MiB", "cache MiB", "entries"], rows)
        h = sv["headline"]
        print(
            f"latency N={h['n_last']} / N={h['n_first']}: wall {h['wall_ratio_last_over_first']:.2f}, "
            f"CPU {h['cpu_ratio_last_over_first']:.2f} (goal <= 1.2); fds {h['fds_min_max_after_first']} "
            f"(min/max after N={h['n_first']}); RSS {h['rss_mib_first']:.0f} -> {h['rss_mib_last']:.0f} MiB "
            f"(max {h['rss_mib_max']:.0f}); cache max {h['cache_bytes_max'] / 2**20:.1f} MiB of "
            f"{h['cache_budget_bytes'] / 2**20:.0f} MiB ({h['cache_bytes_max_over_budget']:.2f}); outcomes "
            f"{sv['outcomes']}; {sv['loop_s']:.0f} s"
        )
    lv = result.get("live")
    if lv:
        print(
            f"\n== live server, --max-loras 2, every request a new adapter (N={lv['n']}): client ms (median "
            "of the window before N), server tree fds / RSS at N =="
        )
        rows = []
        marks = list(lv["sides"]["baseline"]["windows"])
        for m in marks:
            b, p = lv["sides"]["baseline"]["windows"][m], lv["sides"]["plugin"]["windows"].get(m)
            if p is None:
                continue
            rows.append(
                [
                    m,
                    fmt(b["latency_ms_median"], ".1f"),
                    fmt(p["latency_ms_median"], ".1f"),
                    fmt(b["server_cpu_ms_per_request"], ".1f"),
                    fmt(p["server_cpu_ms_per_request"], ".1f"),
                    b["fds"],
                    p["fds"],
                    api_fds(lv, "baseline", b["sampled_at_n"]),
                    api_fds(lv, "plugin", p["sampled_at_n"]),
                    fmt(b["rss_mib"], ".0f"),
                    fmt(p["rss_mib"], ".0f"),
                ]
            )
        print_table(
            [
                "N",
                "base ms",
                "plugin ms",
                "base cpu ms/req",
                "plugin cpu ms/req",
                "base fds",
                "plugin fds",
                "base API fds",
                "plugin API fds",
                "base RSS",
                "plugin RSS",
            ],
            rows,
        )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sv, lv = result.get("service"), result.get("live")
    ncols = 4
    nrows = (1 if sv else 0) + (1 if lv else 0)
    if nrows == 0:
        return
    fig, axes = plt.subplots(nrows, ncols, figsize=(18, 4.2 * nrows), squeeze=False)
    r = 0
    if sv:
        ax = axes[r]
        xs = [b["n"] for b in sv["bins"]["wall"]]
        ax[0].plot(xs, [b["median"] * 1e3 for b in sv["bins"]["wall"]], label="wall median", color="tab:blue")
        ax[0].plot(xs, [b["p90"] * 1e3 for b in sv["bins"]["wall"]], label="wall p90", color="tab:blue", alpha=0.3)
        ax[0].plot(xs, [b["median"] * 1e3 for b in sv["bins"]["cpu"]], label="thread CPU median", color="tab:orange")
        ax[0].set_xscale("log")
        ax[0].set_ylim(bottom=0)
        ax[0].set_title(f"service: prepare latency per adapter (bins of {sv['bins']['size']})", fontsize=9)
        ax[0].set_xlabel("distinct adapters prepared (N)")
        ax[0].set_ylabel("ms")
        ax[0].legend(fontsize=7)
        ns = [s["n"] for s in sv["samples"]]
        fds = [s["fds"] for s in sv["samples"]]
        ax[1].plot(ns, fds, color="tab:green", label=f"open fds ({fds[0]} -> {fds[-1]})")
        ax[1].plot(ns, [s["leases"] for s in sv["samples"]], color="tab:purple", label="lease rows (index)")
        ax[1].set_title("service: open fds, leases", fontsize=9)
        ax[1].set_ylim(bottom=0)
        ax[1].legend(fontsize=7)
        ax[2].plot(ns, [s["rss"] / 2**20 for s in sv["samples"]], color="tab:red")
        ax[2].set_title("service process RSS (MiB)", fontsize=9)
        ax[2].set_ylim(bottom=0)
        ax[3].plot(ns, [s["cache_bytes"] / 2**20 for s in sv["samples"]], label="cache bytes (index)")
        ax[3].axhline(sv["budget_bytes"] / 2**20, color="k", ls="--", lw=1, label="budget")
        ax[3].set_title("service: cache MiB vs budget", fontsize=9)
        ax[3].set_ylim(bottom=0)
        ax[3].legend(fontsize=7)
        for a_ in ax[1:]:
            a_.set_xlabel("N")
        r += 1
    if lv:
        ax = axes[r]
        for side, color in (("baseline", "tab:gray"), ("plugin", "tab:blue")):
            d = lv["sides"][side]
            lat = d["latency_s"]
            size = max(1, len(lat) // 100)
            b = bins(lat, len(lat), size)
            ax[0].plot([x["n"] for x in b], [x["median"] * 1e3 for x in b], color=color, label=f"{side} median")
            ax[0].plot([x["n"] for x in b], [x["p90"] * 1e3 for x in b], color=color, alpha=0.3, label=f"{side} p90")
            ns = [s["n"] for s in d["samples"]]
            fds = [s["fds"] for s in d["samples"]]
            api = [s["per_proc"][0]["fds"] if s["per_proc"] else None for s in d["samples"]]
            rss = [s["rss"] / 2**20 for s in d["samples"]]
            ax[1].plot(ns, fds, color=color, label=f"{side}: whole tree ({fds[0]} -> {fds[-1]})")
            ax[1].plot(ns, api, color=color, ls="--", label=f"{side}: API server process ({api[0]} -> {api[-1]})")
            ax[2].plot(ns, rss, color=color, label=f"{side} ({rss[0]:.0f} -> {rss[-1]:.0f} MiB)")
            cpu = [
                (s1["cpu_s"] - s0["cpu_s"]) / max(1, s1["n"] - s0["n"]) * 1e3
                for s0, s1 in zip(d["samples"], d["samples"][1:])
            ]
            ax[3].plot(ns[1:], cpu, color=color, label=side)
        ax[0].set_title(
            f"live, --max-loras 2: client ms per new adapter (bins of {max(1, lv['n'] // 100)})", fontsize=9
        )
        ax[0].set_ylabel("ms")
        ax[1].set_title("live: open fds of the server process tree", fontsize=9)
        ax[2].set_title("live: RSS of the server process tree (MiB, summed)", fontsize=9)
        ax[3].set_title("live: server CPU ms per request (incl. floor requests)", fontsize=9)
        for a_ in ax:
            a_.set_xlabel("N (requests, each a new adapter)")
            a_.set_ylim(bottom=0)
            a_.legend(fontsize=7)
    fig.suptitle(
        f"vllm-safelora scale: {result.get('config', {}).get('adapters', '').split(';')[0]}; shared 2-core CPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="service 3,000 adapters, live 300 per side")
    p.add_argument("--service-n", type=int, default=None, help="distinct adapters through the service (100000)")
    p.add_argument("--live-n", type=int, default=None, help="new adapters per live server (3000)")
    p.add_argument("--budget-mb", type=float, default=200.0, help="service cache budget, MiB (200)")
    p.add_argument(
        "--live-budget-mb",
        type=float,
        default=32.0,
        help="plugin server's cache budget, MiB (32: about 1,000 entries, so eviction runs)",
    )
    p.add_argument(
        "--modules",
        default="q_proj,v_proj",
        help="target modules of every adapter (q_proj,v_proj: ~30 KB each, as in the first scale round)",
    )
    p.add_argument("--window", type=int, default=200, help="prepares per median window (200)")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the parts (service / live) of an existing --out JSON that this run skips",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/scale.json)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument(
        "--plot-only", type=Path, default=None, metavar="JSON", help="re-print a saved result, redraw its PNG"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.plot_only:
        result = json.loads(a.plot_only.read_text())
        print_summary(result)
        plot(result, a.plot_only.with_suffix(".png"))
        return 0
    a.service_n = a.service_n or (3_000 if a.quick else 100_000)
    a.live_n = a.live_n or (300 if a.quick else 3_000)
    out = a.out or (RESULTS_DIR / ("scale_quick.json" if a.quick else "scale.json"))
    a.partial_path = out.with_suffix(".partial.json")
    a.partial_every = max(1, a.service_n // 10) if a.service_n >= 10_000 else 0
    os.environ["VLLM_PLUGINS"] = "none"
    work = Path(tempfile.mkdtemp(prefix="safelora-scale-")) if a.workdir is None else a.workdir
    a.log_dir = Path(tempfile.mkdtemp(prefix="safelora-scale-logs-"))
    print(f"workdir {work}; server logs {a.log_dir}")
    try:
        import subprocess

        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
        ).stdout.strip()
    except Exception:
        commit = None
    result: dict = {
        "benchmark": "scale",
        "date": now_iso(),
        "quick": a.quick,
        "git_commit": commit,
        "command": " ".join(["python", "benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "note": SHARED_NOTE,
        "config": {
            "adapters": f"rank 8 on {a.modules} of the tiny Llama, float32; PEFT template config, "
            "new Gaussian weights per adapter",
            "service": "SafeLoRAService.start (projection_threads 1); per adapter: write source, prepare + "
            "mark_loaded (timed), delete source",
            "live_request": f"POST /v1/completions, prompt {PROMPT!r}, max_tokens 1, temperature 0, each a new adapter",
            "live_server_flags": " ".join(server_args("MODEL", max_loras=2, max_num_seqs=8)[2:]),
            "baseline": "VLLM_PLUGINS=lora_filesystem_resolver, VLLM_LORA_RESOLVER_CACHE_DIR, runtime LoRA updating",
            "plugin": "VLLM_PLUGINS=safelora,safelora_routes, adapter_dirs = the same directory",
        },
    }
    if a.keep and out.exists():
        old = json.loads(out.read_text())
        for part, skipped in (("service", a.skip_service), ("live", a.skip_live)):
            if skipped and part in old:
                result[part] = old[part]
                result.setdefault("kept_from_earlier_run", {})[part] = {
                    k: old.get(k) for k in ("date", "command", "git_commit")
                }
    try:
        print("making tiny models, a template adapter and a bank ...")
        world = make_world(work, a.modules.split(","))
        result["config"]["adapter_bytes"] = dir_bytes(world["template"])
        if not a.skip_service:
            gc.collect()
            result["service"] = run_service(world, work, a)
            save_json(a.partial_path, result)
            if not a.skip_live:
                print_summary(result)
        if not a.skip_live:
            result["live"] = run_live(world, work, a)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(result)
    save_json(out, result)
    a.partial_path.unlink(missing_ok=True)
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"\nsaved {out}\nsaved {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
