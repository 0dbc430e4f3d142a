"""Safe LoRA projection speed: the fast r x r path against the paper's dense arithmetic.

Fast path: ``vllm_safelora.projection.analyze_module`` (C B from the SVD form in float32,
then the r x r traces in float64): everything it does per module is timed.

Dense reference (IBM SafeLoRA ``projected_weighted``): C = V V^T / ||V|| is precomputed per
module (the paper keeps it in memory), and the timed part is what it does per adapter
module: W = C @ B, fW = W @ A, ori = B @ A (two d_out x d_in products) and the cosine over the
flattened matrices.

Shapes default to Llama-2-7B's q_proj / v_proj: 64 modules of 4096 x 4096. A full SVD of one
4096 x 4096 takes about 11 s on a 2-core CPU, so only ``--distinct`` alignment matrices are
built (low-rank part with a decaying spectrum plus noise) and cycled over the module slots;
each slot gets its own lora_A / lora_B. The output says so.

    python benchmarks/projection_speed.py                 # full default (several minutes)
    python benchmarks/projection_speed.py --quick         # < 1 minute smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_safelora.projection import ProjectionKind, Subspace, analyze_module  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "projection_speed.json"


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"size must be D or DOUTxDIN, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="module shapes d_out x d_in (default 4096x4096; --quick 1024x1024)")
    p.add_argument("--ranks", nargs="+", type=int, default=None, help="LoRA ranks (default 8 64)")
    p.add_argument("--modules", type=int, default=None,
                   help="modules per adapter (default 64: Llama-2-7B q/v; --quick 8)")
    p.add_argument("--distinct", type=int, default=None,
                   help="distinct alignment matrices built and cycled over the modules (default 4; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="passes over the adapter (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--kind", choices=[k.value for k in ProjectionKind], default="approx")
    p.add_argument("--signal-rank", type=int, default=256,
                   help="rank of the decaying low-rank part of each V (capped at min(d_out, d_in))")
    p.add_argument("--no-svd64", action="store_true",
                   help="skip the float64-SVD variant in the accuracy check (it costs one float64 SVD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="small dims for a smoke run (< 1 minute)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    if args.sizes is None:
        args.sizes = [(1024, 1024)] if quick else [(4096, 4096)]
    if args.ranks is None:
        args.ranks = [8, 64]
    if args.modules is None:
        args.modules = 8 if quick else 64
    if args.distinct is None:
        args.distinct = 2 if quick else 4
    if args.repeats is None:
        args.repeats = 2 if quick else 3
    args.distinct = max(1, min(args.distinct, args.modules))
    return args


def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------
# Problem construction
# --------------------------------------------------------------------------


def make_alignment_matrix(d_out: int, d_in: int, signal_rank: int, gen: torch.Generator) -> torch.Tensor:
    """float32 V = low-rank part with a decaying spectrum + small dense noise."""
    k = max(1, min(signal_rank, d_out, d_in))
    left, _ = torch.linalg.qr(torch.randn(d_out, k, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen))
    spectrum = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 8))
    noise = torch.randn(d_out, d_in, generator=gen) * (0.02 / (d_out * d_in) ** 0.25)
    return ((left * spectrum) @ right.T + noise) * 0.05


def make_lora(d_out: int, d_in: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(r, d_in, generator=gen) / d_in**0.5
    B = torch.randn(d_out, r, generator=gen) * 0.01
    return A.contiguous(), B.contiguous()


class Bank:
    """What each side keeps per distinct module: the fast path's SVD, the paper's dense C."""

    def __init__(self, V: torch.Tensor, kind: ProjectionKind):
        t0 = time.perf_counter()
        U, S, _ = torch.linalg.svd(V, full_matrices=False)
        self.svd_s = time.perf_counter() - t0
        self.sub = Subspace(U=U.contiguous(), S=S, frobenius_norm=float(torch.linalg.norm(V)))
        t0 = time.perf_counter()
        if kind is ProjectionKind.APPROX:
            self.C = torch.mm(V, V.t()) / torch.norm(V)
        else:  # V (V^T V)^+ V^T, densely, as the reference would
            self.C = torch.mm(V, torch.mm(torch.linalg.pinv(torch.mm(V.t(), V)), V.t()))
        self.dense_c_s = time.perf_counter() - t0


# --------------------------------------------------------------------------
# The two timed paths
# --------------------------------------------------------------------------


def fast_path(bank: Bank, A: torch.Tensor, B: torch.Tensor, kind: ProjectionKind):
    a = analyze_module("m", bank.sub, A, B, 2.0, kind)
    return a.projected_B, a.score.cosine


def dense_path(bank: Bank, A: torch.Tensor, B: torch.Tensor):
    W = torch.mm(bank.C, B)
    fW = torch.mm(W, A)
    ori = torch.mm(B, A)
    cos = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item()
    return W, cos


def cb_orientation_probe(bank: Bank, B: torch.Tensor, kind: ProjectionKind, n: int = 10) -> dict:
    """Median ms of C B alone: as apply_operator does it (U.T @ B) vs (B.T @ U).T (same math).

    Some CPU BLAS builds run the transposed-operand thin GEMM several times slower.
    """
    U = bank.sub.U
    w = bank.sub.weights(kind).unsqueeze(1)

    def current():
        return U @ (w * (U.T @ B))

    def alternative():
        return U @ (w * (B.T @ U).T)

    out = {}
    for label, fn in (("U_T_at_B", current), ("B_T_at_U_transposed", alternative)):
        fn()
        ts = [timed(fn)[0] for _ in range(n)]
        out[label + "_ms"] = statistics.median(ts) * 1e3
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------
# Accuracy on one module vs float64
# --------------------------------------------------------------------------


def accuracy(V: torch.Tensor, bank: Bank, A: torch.Tensor, B: torch.Tensor, kind: ProjectionKind,
             svd64: bool) -> dict:
    V64, A64, B64 = V.double(), A.double(), B.double()
    if kind is ProjectionKind.APPROX:
        C64 = V64 @ V64.T / torch.linalg.norm(V64)
    else:
        C64 = V64 @ torch.linalg.pinv(V64.T @ V64) @ V64.T
    W64 = C64 @ B64
    del C64
    ori = B64 @ A64
    cos64 = torch.nn.functional.cosine_similarity((W64 @ A64).reshape(1, -1), ori.reshape(1, -1)).item()
    del ori

    def rel(x):
        return float(torch.linalg.norm(x.double() - W64) / torch.linalg.norm(W64))

    fast_B, fast_cos = fast_path(bank, A, B, kind)
    dense_B, dense_cos = dense_path(bank, A, B)
    out = {
        "cosine_float64": cos64,
        "fast_svd32": {"cb_rel_err": rel(fast_B), "cosine": fast_cos, "cosine_abs_err": abs(fast_cos - cos64)},
        "dense_float32": {"cb_rel_err": rel(dense_B), "cosine": dense_cos, "cosine_abs_err": abs(dense_cos - cos64)},
    }
    if svd64:
        t0 = time.perf_counter()
        U, S, _ = torch.linalg.svd(V64, full_matrices=False)
        secs = time.perf_counter() - t0
        sub = Subspace(U=U.float().contiguous(), S=S.float(), frobenius_norm=float(torch.linalg.norm(V64)))
        del U
        a = analyze_module("m", sub, A, B, 2.0, kind)
        out["fast_svd64"] = {"cb_rel_err": rel(a.projected_B), "cosine": a.score.cosine,
                             "cosine_abs_err": abs(a.score.cosine - cos64), "svd64_seconds": secs}
    return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kind = ProjectionKind(args.kind)
    gen = torch.Generator().manual_seed(args.seed)
    info = machine_info()
    results = []
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch_version']}, "
          f"{info['torch_threads']} threads, load {info['load_average_at_start']}")
    print(f"note: {args.distinct} distinct alignment matrices per shape are cycled over the "
          f"{args.modules} module slots (each slot has its own lora_A/lora_B).")

    for d_out, d_in in args.sizes:
        Vs, banks = [], []
        for _ in tqdm(range(args.distinct), desc=f"bank {d_out}x{d_in} (SVD + dense C)", unit="mod"):
            V = make_alignment_matrix(d_out, d_in, args.signal_rank, gen)
            Vs.append(V)
            banks.append(Bank(V, kind))
        for r in args.ranks:
            loras = [make_lora(d_out, d_in, r, gen) for _ in range(args.modules)]
            # warm-up (allocator, thread pool, BLAS kernels)
            fast_path(banks[0], *loras[0], kind)
            dense_path(banks[0], *loras[0])
            fast_t, dense_t = [], []
            fast_tot, dense_tot = [], []
            bar = tqdm(total=args.repeats * args.modules, desc=f"time {d_out}x{d_in} r={r}", unit="mod")
            for _rep in range(args.repeats):
                f_sum = d_sum = 0.0
                for slot in range(args.modules):
                    bank = banks[slot % args.distinct]
                    A, B = loras[slot]
                    tf, _ = timed(fast_path, bank, A, B, kind)
                    td, _ = timed(dense_path, bank, A, B)
                    fast_t.append(tf)
                    dense_t.append(td)
                    f_sum += tf
                    d_sum += td
                    bar.update(1)
                fast_tot.append(f_sum)
                dense_tot.append(d_sum)
            bar.close()
            probe = cb_orientation_probe(banks[0], loras[0][1], kind)
            acc = accuracy(Vs[0], banks[0], *loras[0], kind, svd64=not args.no_svd64)
            fast_ms = statistics.median(fast_t) * 1e3
            dense_ms = statistics.median(dense_t) * 1e3
            results.append({
                "d_out": d_out, "d_in": d_in, "rank": r, "kind": kind.value,
                "modules": args.modules, "distinct_alignment_matrices": args.distinct,
                "repeats": args.repeats,
                "fast_ms_per_module_median": fast_ms,
                "dense_ms_per_module_median": dense_ms,
                "fast_ms_per_module_min": min(fast_t) * 1e3,
                "dense_ms_per_module_min": min(dense_t) * 1e3,
                "fast_s_per_adapter_median": statistics.median(fast_tot),
                "dense_s_per_adapter_median": statistics.median(dense_tot),
                "ratio_dense_over_fast": dense_ms / fast_ms,
                "svd_seconds_per_module_mean": statistics.mean(b.svd_s for b in banks),
                "dense_C_seconds_per_module_mean": statistics.mean(b.dense_c_s for b in banks),
                "cb_only_orientation_probe": probe,
                "accuracy_vs_float64_module0": acc,
            })
        del Vs, banks

    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "benchmark": "projection_speed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "machine": info,
        "notes": [
            f"{args.distinct} distinct alignment matrices per shape (low-rank decaying part + noise) "
            f"are cycled over the {args.modules} module slots; each slot has its own lora_A / lora_B.",
            "fast = vllm_safelora.projection.analyze_module (C B via the SVD form in float32, "
            "float64 r x r traces); dense = precomputed C (paper), timing C@B, (C B)@A, B@A and the "
            "flattened cosine_similarity.",
            "accuracy: one module against a float64 dense computation; fast_svd64 uses a float64 SVD "
            "cast to float32, fast_svd32 the float32 SVD that was timed.",
        ],
        "results": results,
    }


def print_table(report: dict) -> None:
    rows = report["results"]
    head = (f"{'shape':>11} {'r':>3} {'fast ms/mod':>11} {'dense ms/mod':>12} {'ratio':>6} "
            f"{'fast s/adapter':>14} {'dense s/adapter':>15}")
    print("\n" + head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['d_out']:>5}x{row['d_in']:<5} {row['rank']:>3} {row['fast_ms_per_module_median']:>11.2f} "
              f"{row['dense_ms_per_module_median']:>12.2f} {row['ratio_dense_over_fast']:>5.1f}x "
              f"{row['fast_s_per_adapter_median']:>14.3f} {row['dense_s_per_adapter_median']:>15.3f}")
    for row in rows:
        p = row["cb_only_orientation_probe"]
        print(f"C B alone, {row['d_out']}x{row['d_in']} r={row['rank']}: U.T @ B {p['U_T_at_B_ms']:.2f} ms, "
              f"(B.T @ U).T {p['B_T_at_U_transposed_ms']:.2f} ms")
    print(f"\n(per adapter = {rows[0]['modules']} modules; medians over {rows[0]['repeats']} passes)"
          if rows else "")
    print("\naccuracy vs float64, one module:")
    head = f"{'shape':>11} {'r':>3} {'path':>13} {'C B rel err':>12} {'cosine':>10} {'|cos err|':>10}"
    print(head)
    print("-" * len(head))
    for row in rows:
        acc = row["accuracy_vs_float64_module0"]
        print(f"{row['d_out']:>5}x{row['d_in']:<5} {row['rank']:>3} {'float64':>13} {0.0:>12.1e} "
              f"{acc['cosine_float64']:>10.6f} {0.0:>10.1e}")
        for label in ("dense_float32", "fast_svd32", "fast_svd64"):
            if label in acc:
                a = acc[label]
                print(f"{'':>11} {'':>3} {label:>13} {a['cb_rel_err']:>12.1e} {a['cosine']:>10.6f} "
                      f"{a['cosine_abs_err']:>10.1e}")
    for note in report["notes"]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = resolve_defaults(build_parser().parse_args(argv))
    t0 = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = time.perf_counter() - t0
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
