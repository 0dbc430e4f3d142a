"""Adapter load latency: a tenant's first request for an adapter, plain vLLM vs vllm-safelora.

Both servers run the tiny Llama of ``vllm_safelora.tiny`` with the same flags
(``--max-loras 2``, runtime LoRA updating on) and resolve adapters by name from the
same directory:

* baseline: vLLM's own filesystem resolver (``VLLM_PLUGINS=lora_filesystem_resolver``,
  ``VLLM_LORA_RESOLVER_CACHE_DIR=<dir>``; the safelora plugin is excluded, checked);
* plugin: the safelora resolver (``adapter_dirs: [<dir>]``), a fresh, empty cache per
  server, policy threshold 0.35.

Each request is a completion of 1 token for a short prompt, timed at the client; a
base-model request with the same prompt gives the floor. Per server, for each of N fresh
adapters (7 target modules, rank 8, orthogonal to the alignment subspace so they get
projected):

* ``cold``: first request naming the adapter (plugin: read, validate, project, write to
  the cache, then vLLM loads it; baseline: vLLM loads the directory);
* ``resident``: the next request (adapter already in vLLM's GPU/CPU LoRA slots);
* ``same_content_new_name``: a copy of the adapter under another name (plugin: cache hit,
  no projection; baseline: just another cold load);
* ``unload_reload``: ``POST /v1/unload_lora_adapter``, then a request again (plugin:
  resolver + cache hit; baseline: resolver again);
* ``after_eviction``: after N > --max-loras other adapters were used, the adapter is
  requested again: vLLM's worker re-reads it from disk (plugin: the cache entry, re-verified
  by the worker guard).

The projection's share of the cold time comes from the plugin's
``safelora_projection_seconds`` metric (read, project, write: its delta around each cold
request) and from the audit report's ``seconds`` (the projection itself). Servers
alternate baseline / plugin; medians over all adapters of all runs.

    python benchmarks/load_latency.py            # 2 runs per side x 8 adapters, about 6 minutes
    python benchmarks/load_latency.py --quick    # 1 run per side x 3 adapters
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    SHARED_NOTE,
    ServerProcess,
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
PHASES = ("base", "cold", "resident", "same_content_new_name", "unload_reload", "after_eviction")


def make_world(work: Path, n: int) -> dict:
    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import LINEAR_MODULES, make_tiny_adapter, make_tiny_models

    models = make_tiny_models(work / "models")
    root = work / "adapters"
    names = []
    for i in range(n + 1):  # + one warm-up adapter
        name = "warmup" if i == n else f"fresh{i}"
        make_tiny_adapter(
            models.aligned,
            root / name,
            seed=300 + i,
            direction="orthogonal",
            base_dir=models.base,
            target_modules=LINEAR_MODULES,
        )
        if i < n:
            shutil.copytree(root / name, root / f"copy{i}")  # same content, another name
            names.append(name)
    bank = work / "bank"
    build_bank(str(models.base), str(models.aligned), bank, overwrite=True, progress=None)
    return {"models": models, "root": root, "names": names, "bank": bank}


class Client:
    def __init__(self, server: ServerProcess, model_path: str):
        import requests

        self.s = requests.Session()
        self.server = server
        self.url = server.base_url
        self.model_path = model_path

    def complete(self, model: str) -> float:
        t0 = time.perf_counter()
        r = self.s.post(
            f"{self.url}/v1/completions",
            json={"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
            timeout=120,
        )
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"completion for {model} failed: HTTP {r.status_code} {r.text[:300]}")
        return dt

    def unload(self, name: str) -> None:
        r = self.s.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"unload {name} failed: HTTP {r.status_code} {r.text[:300]}")

    def projection_seconds(self) -> float:
        return self.server.metrics().value("safelora_projection_seconds_sum")


def one_run(side: str, run: int, world: dict, work: Path, a) -> dict:
    model = str(world["models"].aligned)
    args = server_args(model, max_loras=a.max_loras, max_num_seqs=8)
    if side == "baseline":
        env = baseline_env(
            "lora_filesystem_resolver", runtime_lora=True, VLLM_LORA_RESOLVER_CACHE_DIR=str(world["root"])
        )
    else:
        cache = work / f"cache-{run}"
        shutil.rmtree(cache, ignore_errors=True)
        config = write_safelora_config(
            work / f"safelora-{run}.yaml", bank=world["bank"], adapter_dirs=[world["root"]], cache_dir=cache
        )
        env = plugin_env(config)
    log = a.log_dir / f"{side}-{run}.log"
    t: dict[str, list[float]] = {p: [] for p in PHASES}
    proj_metric: list[float] = []
    proj_report: list[float] = []
    out: dict = {"side": side, "run": run, "env_VLLM_PLUGINS": env.get("VLLM_PLUGINS")}
    with served(args, env, log) as server:
        out["startup_s"] = server.startup_s
        out["plugin_check"] = check_plugin_state(server, expect_plugin=(side == "plugin"))
        c = Client(server, model)
        for _ in range(3):
            c.complete(model)  # engine warm-up
        c.complete("warmup")  # first LoRA ever: one-off LoRA warm-up outside the measurements
        c.complete("warmup")
        names = world["names"]
        for name in names:
            t["base"].append(c.complete(model))
            before = c.projection_seconds() if side == "plugin" else 0.0
            t["cold"].append(c.complete(name))
            if side == "plugin":
                proj_metric.append(c.projection_seconds() - before)
                r = server.get(f"/safelora/v1/adapters/{name}")
                if r.status_code == 200:
                    proj_report.append(r.json()["summary"]["seconds"])
            t["resident"].append(c.complete(name))
        # Every fresh adapter has been evicted from vLLM's LoRA slots by now (N > --max-loras)
        # unless it is one of the last max_loras used: request the oldest ones again.
        for i, name in enumerate(names):
            if i >= len(names) - a.max_loras:
                break
            # vLLM's LoRA slots (--max-loras, CPU cache --max-cpu-loras = max-loras) hold the last
            # max_loras adapters used; each of these was pushed out and is re-read from disk.
            t["after_eviction"].append(c.complete(name))
        for i in range(len(names)):
            t["same_content_new_name"].append(c.complete(f"copy{i}"))
        for name in names:
            c.unload(name)
            t["unload_reload"].append(c.complete(name))
        if side == "plugin":
            metrics = server.metrics()
            out["plugin_metrics"] = {
                m: metrics.value(m)
                for m in (
                    "safelora_projections_total",
                    "safelora_projection_seconds_count",
                    "safelora_projection_seconds_sum",
                )
            }
            out["plugin_metrics"]["safelora_cache_requests_total"] = metrics.by_labels("safelora_cache_requests_total")
    out["latency_s"] = t
    out["projection_metric_s"] = proj_metric
    out["projection_report_s"] = proj_report
    out["log"] = str(log)
    b = median(t["base"])
    print(
        f"  [{side} #{run}] up in {out['startup_s']:.0f}s; medians ms: base {b * 1e3:.1f}, "
        + ", ".join(f"{p} {median(t[p]) * 1e3:.1f}" for p in PHASES[1:] if t[p])
        + (f"; projection (metric) {median(proj_metric) * 1e3:.1f}" if proj_metric else "")
    )
    return out


def summarize(runs: list[dict]) -> dict:
    s: dict = {}
    for side in ("baseline", "plugin"):
        rs = [r for r in runs if r["side"] == side]
        lat = {p: [x for r in rs for x in r["latency_s"][p]] for p in PHASES}
        base = median(lat["base"])
        s[side] = {
            "median_ms": {p: (median(v) * 1e3 if v else None) for p, v in lat.items()},
            "p90_ms": {p: (statistics.quantiles(v, n=10)[-1] * 1e3 if len(v) >= 4 else None) for p, v in lat.items()},
            "median_over_base_ms": {p: ((median(v) - base) * 1e3 if v else None) for p, v in lat.items()},
            "samples": {p: len(v) for p, v in lat.items()},
        }
        if side == "plugin":
            pm = [x for r in rs for x in r["projection_metric_s"]]
            pr = [x for r in rs for x in r["projection_report_s"]]
            colds = [x for r in rs for x in r["latency_s"]["cold"]]
            s[side]["projection_metric_median_ms"] = median(pm) * 1e3 if pm else None
            s[side]["projection_report_median_ms"] = median(pr) * 1e3 if pr else None
            s[side]["projection_share_of_cold"] = (median(pm) / median(colds)) if pm and colds else None
            s[side]["projection_share_of_cold_per_request_median"] = (
                median([p / c for p, c in zip(pm, colds)]) if pm and len(pm) == len(colds) else None
            )
    s["ratio_plugin_over_baseline_median"] = {
        p: (
            s["plugin"]["median_ms"][p] / s["baseline"]["median_ms"][p]
            if s["baseline"]["median_ms"][p] and s["plugin"]["median_ms"][p]
            else None
        )
        for p in PHASES
    }
    s["extra_ms_plugin_minus_baseline_median"] = {
        p: (
            s["plugin"]["median_ms"][p] - s["baseline"]["median_ms"][p]
            if s["baseline"]["median_ms"][p] is not None and s["plugin"]["median_ms"][p] is not None
            else None
        )
        for p in PHASES
    }
    return s


def print_summary(s: dict) -> None:
    rows = []
    for p in PHASES:
        rows.append(
            [
                p,
                fmt(s["baseline"]["median_ms"][p], ".1f"),
                fmt(s["plugin"]["median_ms"][p], ".1f"),
                fmt(s["extra_ms_plugin_minus_baseline_median"][p], "+.1f"),
                fmt(s["ratio_plugin_over_baseline_median"][p], ".2f"),
                f"{s['baseline']['samples'][p]}/{s['plugin']['samples'][p]}",
            ]
        )
    print("\n== adapter load latency: client-side ms for a 1-token completion, medians ==")
    print_table(["phase", "baseline", "plugin", "plugin-base", "ratio", "n (b/p)"], rows)
    p = s["plugin"]
    print(
        f"plugin projection (safelora_projection_seconds: read+project+write): median "
        f"{fmt(p['projection_metric_median_ms'], '.1f')} ms; report 'seconds' (projection only): "
        f"{fmt(p['projection_report_median_ms'], '.1f')} ms; share of the cold request: "
        f"{fmt((p['projection_share_of_cold'] or 0) * 100, '.0f')}%"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for j, (side, color) in enumerate((("baseline", "tab:gray"), ("plugin", "tab:blue"))):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(PHASES))]
        ax.bar(xs, [s[side]["median_ms"][p] or 0 for p in PHASES], width=0.36, color=color, label=side)
        for i, p in enumerate(PHASES):
            pts = [x * 1e3 for r in result["runs"] if r["side"] == side for x in r["latency_s"][p]]
            ax.scatter([xs[i]] * len(pts), pts, color="k", s=6, zorder=3)
    proj = s["plugin"]["projection_metric_median_ms"]
    if proj:
        ax.bar([1 + 0.19], [proj], width=0.36, color="tab:red", label="of which projection (metric)")
    ax.set_xticks(range(len(PHASES)), [p.replace("_", "\n") for p in PHASES], fontsize=8)
    ax.set_ylabel("ms (1-token completion, client side)")
    ax.set_title(
        f"adapter load latency, tiny Llama, --max-loras {result['config']['max_loras']}: medians "
        f"(dots: samples; shared 2-core CPU)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run per side, 3 adapters")
    p.add_argument("--repeats", type=int, default=None, help="server runs per side, alternating (default 2; quick 1)")
    p.add_argument("--adapters", type=int, default=None, help="fresh adapters per server (default 8; quick 3)")
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/load_latency.json)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument(
        "--plot-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-summarise a saved result (JSON updated) and redraw its PNG",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.plot_only:
        import json

        result = json.loads(a.plot_only.read_text())
        result["summary"] = summarize(result["runs"])
        print_summary(result["summary"])
        save_json(a.plot_only, result)
        plot(result, a.plot_only.with_suffix(".png"))
        return 0
    a.repeats = a.repeats or (1 if a.quick else 2)
    a.adapters = a.adapters or (3 if a.quick else 8)
    if a.adapters <= a.max_loras:
        raise SystemExit("--adapters must exceed --max-loras (the after_eviction phase needs evictions)")
    out = a.out or (RESULTS_DIR / ("load_latency_quick.json" if a.quick else "load_latency.json"))
    os.environ["VLLM_PLUGINS"] = "none"
    work = Path(tempfile.mkdtemp(prefix="safelora-load-")) if a.workdir is None else a.workdir
    a.log_dir = Path(tempfile.mkdtemp(prefix="safelora-load-logs-"))
    print(f"server logs: {a.log_dir}")
    result: dict = {
        "benchmark": "load_latency",
        "date": now_iso(),
        "quick": a.quick,
        "command": " ".join(["python", "benchmarks/load_latency.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "note": SHARED_NOTE,
        "config": {
            "repeats": a.repeats,
            "adapters_per_server": a.adapters,
            "max_loras": a.max_loras,
            "request": f"POST /v1/completions, prompt {PROMPT!r}, max_tokens 1, temperature 0",
            "adapters": "rank 8 on q,k,v,o,gate,up,down, orthogonal to the alignment subspace (projected)",
            "baseline": "VLLM_PLUGINS=lora_filesystem_resolver, VLLM_LORA_RESOLVER_CACHE_DIR",
            "plugin": "VLLM_PLUGINS=safelora,safelora_routes, adapter_dirs, fresh empty cache per server",
            "server_flags": " ".join(server_args("MODEL", max_loras=a.max_loras, max_num_seqs=8)[2:]),
        },
        "runs": [],
    }
    try:
        print(f"workdir {work}: making tiny models, {a.adapters} adapters (+ copies) and a bank ...")
        world = make_world(work, a.adapters)
        from tqdm import tqdm

        order = [side for _ in range(a.repeats) for side in ("baseline", "plugin")]
        for i, side in enumerate(tqdm(order, desc="server runs", unit="run")):
            result["runs"].append(one_run(side, i // 2, world, work, a))
            save_json(out.with_suffix(".partial.json"), result)
        result["summary"] = summarize(result["runs"])
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(result["summary"])
    save_json(out, result)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"\nsaved {out}\nsaved {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
