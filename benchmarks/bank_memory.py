"""Alignment-bank memory: dense C vs SVD storage vs truncation, what truncation costs, build peak RSS.

Three parts, all saved to ``benchmarks/results/bank_memory.json`` and ``bank_memory.png``:

1. **Llama-2-7B-shaped bank, analytically from shapes** (32 layers; q,k,v,o 4096x4096,
   gate/up 11008x4096, down 4096x11008): bytes held as dense C (what the reference keeps:
   d_out x d_out float32 per module), as the full thin SVD (U: d_out x min(d_out, d_in), S),
   and truncated to several ranks (float32 and bfloat16 U), for all 7 module kinds and for
   the paper's q/v-only setting. Energy cut-offs are not computable from shapes (they
   depend on the spectrum of V): see part 2.
2. **Tiny models, real banks**: ``vllm_safelora.bank.build_bank`` on the tiny Llama of
   ``vllm_safelora.tiny`` (decaying alignment spectrum), and on a variant whose alignment
   delta is a dense Gaussian (flat spectrum, the worst case for truncation), truncated at
   several ``--rank`` / ``--energy`` values. For test adapters (``make_tiny_adapter``
   random / aligned / orthogonal) it reports the change in per-module Safe LoRA cosines and
   in the modules selected (threshold 0.35) against the full bank.
3. **Build peak memory**: two synthetic safetensors checkpoints (default 8 layers x 1024
   hidden, 2752 intermediate, bfloat16; about 460 MB together) in a temp dir. Fresh
   subprocesses report their own peak RSS (VmHWM in /proc/self/status, the kernel's
   high-water mark for the process; ``ru_maxrss`` is recorded too, see ``_peak_rss_bytes``):
   A = ``build_bank`` (streams one module at a time; ``--svd lowrank --rank 64``, and with
   ``--rss-full-svd`` also a full SVD); B = load both full state dicts in float32 like the
   reference, then V and the same decomposition per module; B' = like B, but keeping a dense C per module as the reference does;
   and a subprocess that only imports the same libraries (baseline).

    python benchmarks/bank_memory.py            # about 3-5 minutes on 2 cores
    python benchmarks/bank_memory.py --quick    # < 1 minute smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, machine_info, now_iso, print_table, save_json  # noqa: E402

# ----------------------------------------------------------------------------- part 1: 7B analytics

LLAMA2_7B_LAYERS = 32
LLAMA2_7B_MODULES = {  # (d_out, d_in) of each projection's weight
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def bank_bytes_7b(kinds: list[str], ranks: list[int]) -> dict:
    shapes = [LLAMA2_7B_MODULES[k] for k in kinds]
    n = LLAMA2_7B_LAYERS
    dense_c = n * sum(d_out * d_out * 4 for d_out, _ in shapes)
    full = {
        dt: n * sum(d_out * min(d_out, d_in) * b + min(d_out, d_in) * 4 for d_out, d_in in shapes)
        for dt, b in DTYPE_BYTES.items()
    }
    truncated = {
        str(k): {
            dt: n * sum(d_out * min(k, d_out, d_in) * b + min(k, d_out, d_in) * 4 for d_out, d_in in shapes)
            for dt, b in DTYPE_BYTES.items()
        }
        for k in ranks
    }
    two_models_fp16 = None
    return {
        "modules": n * len(kinds),
        "kinds": kinds,
        "dense_C_float32": dense_c,
        "full_svd": full,
        "truncated": truncated,
        "two_models_fp16_note": two_models_fp16,
    }


def part1(ranks: list[int]) -> dict:
    out = {
        "all_7": bank_bytes_7b(list(LLAMA2_7B_MODULES), ranks),
        "q_v_only": bank_bytes_7b(["q_proj", "v_proj"], ranks),
        # for scale: the fp16 weights of one Llama-2-7B (6.74 B parameters)
        "llama2_7b_fp16_weights_bytes": int(6.74e9 * 2),
    }
    gib = 2**30
    rows = []
    for label, key in (("all 7 kinds (224 modules)", "all_7"), ("q,v only (64 modules)", "q_v_only")):
        d = out[key]
        rows.append([label, "dense C (reference)", "float32", fmt(d["dense_C_float32"] / gib, ".2f")])
        for dt in DTYPE_BYTES:
            rows.append([label, "full SVD (U, S)", dt, fmt(d["full_svd"][dt] / gib, ".2f")])
        for k in ranks:
            for dt in DTYPE_BYTES:
                rows.append([label, f"rank {k}", dt, fmt(d["truncated"][str(k)][dt] / gib, ".3f")])
    print("\n== 1. Llama-2-7B-shaped bank, bytes from shapes ==")
    print_table(["modules", "storage", "dtype", "GiB"], rows)
    return out


# ----------------------------------------------------------------------------- part 2: tiny banks


def _flat_variant(src_models, out_dir: Path, seed: int = 0):
    """Copy the tiny models and replace the alignment delta by a dense Gaussian (flat spectrum)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_safelora.tiny import LINEAR_MODULES, TinyModels

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(src_models.base.parent, out_dir)
    base = load_file(str(out_dir / "base" / "model.safetensors"))
    aligned = load_file(str(out_dir / "aligned" / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 99)
    for name in sorted(aligned):
        if any(name.endswith(f".{m}.weight") for m in LINEAR_MODULES):
            v_old = aligned[name].double() - base[name].double()
            noise = torch.randn(base[name].shape, generator=g, dtype=torch.float64)
            noise *= torch.linalg.norm(v_old) / torch.linalg.norm(noise)  # same ||V||_F as the decaying delta
            aligned[name] = (base[name].double() + noise).float().contiguous()
    save_file(
        {k: aligned[k] for k in sorted(aligned)},
        str(out_dir / "aligned" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return TinyModels(base=out_dir / "base", aligned=out_dir / "aligned")


def _cosines(adapter_dir: Path, bank, policy) -> dict[str, tuple[float, bool]]:
    from vllm_safelora.adapters import read_adapter
    from vllm_safelora.apply_policy import project_adapter

    adapter = read_adapter(adapter_dir)
    outcome = project_adapter(adapter, bank, policy)
    return {m.module: (m.cosine_raw, m.projected) for m in outcome.report.modules}


def part2(work: Path, ranks: list[int], energies: list[float], seeds: list[int], quick: bool) -> dict:
    import torch
    from tqdm import tqdm

    from vllm_safelora.bank import Truncation, build_bank, load_bank
    from vllm_safelora.policies import SafeLoRAConfig
    from vllm_safelora.tiny import LINEAR_MODULES, make_tiny_adapter, make_tiny_models

    torch.manual_seed(0)
    policy = SafeLoRAConfig(select="threshold", threshold=0.35)
    decaying = make_tiny_models(work / "tiny_decaying" / "models")
    variants = {"decaying": decaying, "flat": _flat_variant(decaying, work / "tiny_flat" / "models")}
    results: dict = {"policy": policy.model_dump(mode="json"), "variants": {}}
    cuts = (
        [("full", Truncation())]
        + [(f"rank={k}", Truncation(rank=k)) for k in ranks]
        + [(f"energy={e}", Truncation(energy=e)) for e in energies]
    )
    for vname, models in variants.items():
        adapters = []
        for direction in ("random", "aligned", "orthogonal"):
            for seed in seeds:
                d = work / f"tiny_{vname}" / "adapters" / f"{direction}-{seed}"
                make_tiny_adapter(
                    models.aligned,
                    d,
                    seed=seed,
                    direction=direction,
                    base_dir=models.base,
                    target_modules=LINEAR_MODULES,
                )
                adapters.append((direction, seed, d))
        ref = None
        rows = []
        for label, trunc in tqdm(cuts, desc=f"tiny banks ({vname})", unit="bank"):
            bdir = work / f"tiny_{vname}" / "banks" / label.replace("=", "_")
            manifest = build_bank(
                str(models.base), str(models.aligned), bdir, truncation=trunc, overwrite=True, progress=None
            )
            bank = load_bank(bdir, "cpu")
            per_adapter = {f"{dr}-{s}": _cosines(p, bank, policy) for dr, s, p in adapters}
            if ref is None:
                ref = per_adapter
            dcos, flips, dcos_by_dir = [], 0, {}
            n_mod = 0
            for key, mods in per_adapter.items():
                for mod, (cos, sel) in mods.items():
                    rc, rs = ref[key][mod]
                    dcos.append(abs(cos - rc))
                    dcos_by_dir.setdefault(key.split("-")[0], []).append(abs(cos - rc))
                    flips += int(sel != rs)
                    n_mod += 1
            sel_full = sum(s for mods in ref.values() for _, s in mods.values())
            sel_now = sum(s for mods in per_adapter.values() for _, s in mods.values())
            ranks_kept = [m.rank_kept for m in manifest.modules]
            energy_kept = [m.energy_kept for m in manifest.modules]
            entry = {
                "cut": label,
                "bank_bytes": bank.nbytes,
                "rank_kept_mean": sum(ranks_kept) / len(ranks_kept),
                "rank_kept_max": max(ranks_kept),
                "energy_kept_min": min(energy_kept),
                "max_error_bound": max(m.approx_error_bound for m in manifest.modules),
                "max_abs_dcos": max(dcos),
                "mean_abs_dcos": sum(dcos) / len(dcos),
                "max_abs_dcos_by_direction": {k: max(v) for k, v in dcos_by_dir.items()},
                "selection_flips": flips,
                "modules_scored": n_mod,
                "selected_full_bank": sel_full,
                "selected": sel_now,
            }
            results["variants"].setdefault(vname, []).append(entry)
            rows.append(
                [
                    label,
                    f"{entry['rank_kept_mean']:.1f}",
                    f"{entry['energy_kept_min']:.6f}",
                    f"{bank.nbytes / 1024:.1f}",
                    f"{entry['max_abs_dcos']:.2e}",
                    f"{entry['mean_abs_dcos']:.2e}",
                    f"{flips}/{n_mod}",
                    f"{sel_now} (full {sel_full})",
                ]
            )
        print(
            f"\n== 2. tiny bank, {vname} spectrum: truncation vs full bank "
            f"({len(adapters)} adapters x {len(LINEAR_MODULES) * 2} modules, threshold 0.35) =="
        )
        print_table(["bank", "mean k", "min energy", "KiB", "max|dcos|", "mean|dcos|", "sel. flips", "selected"], rows)
    results["tiny_shapes"] = "hidden 128, intermediate 256, 2 layers; q,k,v,o,gate,up,down (14 modules)"
    results["adapters"] = {
        "directions": ["random", "aligned", "orthogonal"],
        "seeds": seeds,
        "rank": 8,
        "targets": list(LINEAR_MODULES),
    }
    return results


# ----------------------------------------------------------------------------- part 3: build peak RSS


def _synth_shapes(layers: int, hidden: int, inter: int, vocab: int) -> dict[str, tuple[int, int]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{m}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def _child_make(out: Path, layers: int, hidden: int, inter: int, vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    shapes = _synth_shapes(layers, hidden, inter, vocab)
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) / s[1] ** 0.5).to(torch.bfloat16) for k, s in sorted(shapes.items())}
    for role in ("base", "aligned"):
        d = out / role
        d.mkdir(parents=True, exist_ok=True)
        if role == "base":
            sd = base
        else:
            sd = {}
            for k, t in base.items():
                if k.endswith("_proj.weight"):
                    # low-rank alignment delta plus a small dense part (any V: memory is what is measured)
                    d_out, d_in = t.shape
                    u = torch.randn(d_out, 16, generator=g)
                    q = torch.randn(16, d_in, generator=g)
                    v = (u @ q) / (d_in * 4) + torch.randn(d_out, d_in, generator=g) * 1e-3
                    sd[k] = (t.float() + v).to(torch.bfloat16)
                else:
                    sd[k] = t
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "synthetic": True}))
        if role == "aligned":
            del sd


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM from /proc/self/status.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used as the headline: after fork + exec it
    also holds the high-water mark of the pre-exec image, i.e. the parent's RSS at fork
    time (the benchmark's parent has torch loaded), which hides everything below it. It is
    recorded alongside (``ru_maxrss_bytes``).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child_measure(mode: str, ckpt: Path, out: Path, rank: int | None) -> None:
    import torch
    from safetensors.torch import load_file

    from vllm_safelora.bank import DEFAULT_MODULE_SUFFIXES, Truncation, build_bank, decompose_module

    t0 = time.perf_counter()
    info: dict = {"mode": mode, "rank": rank, "rss_after_imports": _peak_rss_bytes()}
    if mode == "baseline":
        pass  # the same imports, nothing else
    elif mode == "stream":
        # with a rank: the randomized SVD (--svd lowrank --rank K), the fast path for big models
        trunc = Truncation(rank=rank) if rank else Truncation()
        build_bank(
            str(ckpt / "base"),
            str(ckpt / "aligned"),
            out / "bank",
            truncation=trunc,
            overwrite=True,
            svd="lowrank" if rank else "full",
            progress=None,
        )
    elif mode in ("full_models", "reference_dense_c"):
        # like the reference: both whole checkpoints in memory, in float32
        base = load_file(str(ckpt / "base" / "model.safetensors"))
        for k in list(base):
            base[k] = base[k].float()
        aligned = load_file(str(ckpt / "aligned" / "model.safetensors"))
        for k in list(aligned):
            aligned[k] = aligned[k].float()
        info["rss_after_loading_both"] = _peak_rss_bytes()
        kept: dict = {}
        for k in sorted(base):
            if not any(k.endswith(f".{m}.weight") for m in DEFAULT_MODULE_SUFFIXES):
                continue
            V = aligned[k] - base[k]
            if mode == "full_models":
                U, S, _ = decompose_module(
                    V, svd="lowrank" if rank else "full", truncation=Truncation(rank=rank) if rank else Truncation()
                )
                kept[k] = (U, S)
            else:
                kept[k] = V @ V.T / torch.linalg.norm(V)  # the reference's dense C
            del V
        info["kept_bytes"] = sum(
            sum(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,))) for v in kept.values()
        )
    else:
        raise SystemExit(f"unknown mode {mode}")
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_bytes"] = _peak_rss_bytes()
    info["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(info))


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def part3(
    work: Path, layers: int, hidden: int, inter: int, vocab: int, rank: int, repeats: int, full_svd: bool
) -> dict:
    from tqdm import tqdm

    ckpt = work / "synthetic"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_child",
            "make",
            "--_ckpt",
            str(ckpt),
            "--mem-layers",
            str(layers),
            "--mem-hidden",
            str(hidden),
            "--mem-intermediate",
            str(inter),
            "--mem-vocab",
            str(vocab),
        ],
        check=True,
    )
    files = {role: (ckpt / role / "model.safetensors").stat().st_size for role in ("base", "aligned")}
    print(
        f"\nsynthetic checkpoints: {layers} layers x {hidden} hidden, {inter} intermediate, vocab {vocab}, "
        f"bfloat16: {sum(files.values()) / 2**20:.0f} MiB on disk ({time.perf_counter() - t0:.0f}s to write)"
    )
    # Same decomposition (randomized SVD, rank K) in A and B: only the streaming differs.
    modes = [("baseline", None), ("stream", rank), ("full_models", rank), ("reference_dense_c", None)]
    if full_svd:  # full SVD of every module: slow on a busy 2-core machine, hence optional
        modes.append(("stream", None))
    runs: dict[str, list[dict]] = {}
    order = [m for _ in range(repeats) for m in modes]  # alternate modes, repeat
    for mode, r in tqdm(order, desc="peak-RSS subprocesses", unit="proc"):
        key = mode if r is None else f"{mode}_rank{r}"
        res = _run_child(
            [
                "--_child",
                mode,
                "--_ckpt",
                str(ckpt),
                "--_out",
                str(work / f"out-{key}"),
                *(["--_rank", str(r)] if r else []),
            ]
        )
        runs.setdefault(key, []).append(res)
    summary = {}
    base_rss = min(x["peak_rss_bytes"] for x in runs["baseline"])
    labels = {
        "baseline": "imports only (baseline)",
        "stream": "A: build_bank streaming, full SVD",
        f"stream_rank{rank}": f"A: build_bank streaming, --svd lowrank --rank {rank}",
        f"full_models_rank{rank}": "B: two full models in float32 + same lowrank SVD",
        "reference_dense_c": "B': two full models in float32 + dense C kept (reference)",
    }
    rows = []
    for key, xs in runs.items():
        peak = sorted(x["peak_rss_bytes"] for x in xs)[len(xs) // 2]
        secs = sorted(x["seconds"] for x in xs)[len(xs) // 2]
        summary[key] = {
            "label": labels[key],
            "peak_rss_bytes_median": peak,
            "peak_rss_above_baseline_bytes": peak - base_rss,
            "seconds_median": secs,
            "runs": xs,
        }
        rows.append([labels[key], f"{peak / 2**20:.0f}", f"{(peak - base_rss) / 2**20:.0f}", f"{secs:.1f}"])
    print(f"\n== 3. build peak RSS (VmHWM of fresh subprocesses, median of {repeats}) ==")
    print_table(["process", "peak RSS MiB", "above baseline MiB", "seconds"], rows)
    return {
        "checkpoint": {
            "layers": layers,
            "hidden": hidden,
            "intermediate": inter,
            "vocab": vocab,
            "dtype": "bfloat16",
            "file_bytes": files,
        },
        "measure": "peak RSS (VmHWM of /proc/self/status) of a fresh subprocess per measurement; "
        "ru_maxrss also recorded per run (it includes the parent's RSS at fork, see _peak_rss_bytes)",
        "results": summary,
    }


# ----------------------------------------------------------------------------- plot


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.1, 1.1, 0.9]})
    # 1: 7B bytes
    ax = axes[0]
    gib = 2**30
    for key, label, color in (("all_7", "all 7 kinds", "tab:blue"), ("q_v_only", "q,v only", "tab:orange")):
        d = result["llama2_7b"][key]
        names = ["dense C", "full SVD"] + [f"k={k}" for k in d["truncated"]]
        vals = [d["dense_C_float32"], d["full_svd"]["float32"]] + [v["float32"] for v in d["truncated"].values()]
        x = range(len(names))
        off = -0.2 if key == "all_7" else 0.2
        ax.bar([i + off for i in x], [v / gib for v in vals], width=0.4, label=label, color=color)
        ax.set_xticks(list(x), names, rotation=30)
    ax.axhline(
        result["llama2_7b"]["llama2_7b_fp16_weights_bytes"] / gib, color="gray", ls="--", lw=1, label="7B fp16 weights"
    )
    ax.set_yscale("log")
    ax.set_ylabel("GiB (float32)")
    ax.set_title("Llama-2-7B-shaped bank (from shapes)")
    ax.legend(fontsize=8)
    # 2: truncation vs cosine change
    ax = axes[1]
    for vname, marker in (("decaying", "o"), ("flat", "s")):
        entries = [e for e in result["tiny"]["variants"][vname] if e["cut"] != "full"]
        xs = [e["rank_kept_mean"] for e in entries]
        ys = [max(e["max_abs_dcos"], 1e-9) for e in entries]
        ax.scatter(xs, ys, marker=marker, label=f"{vname} spectrum")
        for e, x, y in zip(entries, xs, ys):
            if e["selection_flips"]:
                ax.annotate(f"{e['selection_flips']} flips", (x, y), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("mean kept rank per module (tiny, d=128/256)")
    ax.set_ylabel("max |cos - cos_full| over modules")
    ax.set_title("truncation: change in Safe LoRA cosines")
    ax.legend(fontsize=8)
    # 3: peak RSS
    ax = axes[2]
    res = result["build_peak_rss"]["results"]
    keys = list(res)
    ax.barh(range(len(keys)), [res[k]["peak_rss_bytes_median"] / 2**20 for k in keys], color="tab:green")
    short = {
        "baseline": "imports only",
        "stream": "A: streaming,\nfull SVD",
        "full_models": "B: two models",
        "reference_dense_c": "B': two models\n+ dense C (reference)",
    }
    names = [
        short.get(
            k,
            "A: streaming,\n" + k.split("_")[-1].replace("rank", "lowrank ")
            if k.startswith("stream")
            else "B: two models,\n" + k.split("_")[-1].replace("rank", "lowrank "),
        )
        for k in keys
    ]
    vals = [res[k]["peak_rss_bytes_median"] / 2**20 for k in keys]
    ax.set_yticks(range(len(keys)), names, fontsize=8)
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.0f}", (v, i), va="center", fontsize=8)
    files = sum(result["build_peak_rss"]["checkpoint"]["file_bytes"].values()) / 2**20
    ax.set_xlabel(f"peak RSS MiB (checkpoints: {files:.0f} MiB bf16 on disk)")
    ax.set_title("bank build peak memory")
    fig.suptitle("vllm-safelora bank memory (" + result["machine"]["cpu_model"][:40] + ", shared machine)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: smaller synthetic checkpoints, fewer repeats")
    p.add_argument("--ranks-7b", nargs="+", type=int, default=[64, 256, 1024], help="truncation ranks for part 1")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32], help="tiny banks: --rank values")
    p.add_argument(
        "--energies", nargs="+", type=float, default=[0.9, 0.99, 0.999, 0.999999], help="tiny banks: --energy values"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="adapter seeds per direction (default 0 1 2)")
    p.add_argument("--mem-layers", type=int, default=None, help="synthetic checkpoint layers (default 8; quick 2)")
    p.add_argument("--mem-hidden", type=int, default=1024)
    p.add_argument("--mem-intermediate", type=int, default=2752)
    p.add_argument("--mem-vocab", type=int, default=8192)
    p.add_argument("--mem-rank", type=int, default=64, help="truncated streaming build measured in part 3")
    p.add_argument(
        "--repeats", type=int, default=None, help="peak-RSS subprocesses per mode (default 1; RSS barely varies)"
    )
    p.add_argument(
        "--rss-full-svd",
        action="store_true",
        help="also measure a streaming build with a full SVD of every module (slow on small CPUs)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bank_memory.json)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="redraw the PNG from a saved result")
    p.add_argument("--skip", nargs="*", default=[], choices=["7b", "tiny", "rss"], help="parts to skip")
    # internal: child processes of part 3
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_rank", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    if args._child == "make":
        _child_make(args._ckpt, args.mem_layers, args.mem_hidden, args.mem_intermediate, args.mem_vocab)
        return 0
    if args._child:
        _child_measure(args._child, args._ckpt, args._out, args._rank)
        return 0

    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    layers = args.mem_layers or (2 if quick else 8)
    repeats = args.repeats or 1
    out = args.out or (RESULTS_DIR / ("bank_memory_quick.json" if quick else "bank_memory.json"))
    ranks = args.ranks if not quick else [1, 4, 16]
    energies = args.energies if not quick else [0.99, 0.999999]
    result: dict = {
        "benchmark": "bank_memory",
        "date": now_iso(),
        "quick": quick,
        "command": " ".join(["python", "benchmarks/bank_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="safelora-bankmem-")) if args.workdir is None else args.workdir
    try:
        if "7b" not in args.skip:
            result["llama2_7b"] = part1(args.ranks_7b)
        if "tiny" not in args.skip:
            result["tiny"] = part2(tmp, ranks, energies, seeds, quick)
        if "rss" not in args.skip:
            result["build_peak_rss"] = part3(
                tmp,
                layers,
                args.mem_hidden,
                args.mem_intermediate,
                args.mem_vocab,
                args.mem_rank,
                repeats,
                args.rss_full_svd,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    save_json(out, result)
    print(f"\nsaved {out}")
    if not args.skip:
        png = out.with_suffix(".png")
        plot(result, png)
        print(f"saved {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
