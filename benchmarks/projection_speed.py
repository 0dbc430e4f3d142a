"""Safe LoRA projection speed: the fast r x r path against the paper's dense arithmetic.

One command, one process, the same inputs for both sides:

* **fast**: ``vllm_safelora.projection.analyze_module`` (C B = U (w * (U^T B)) in float32 from the
  bank's SVD form, then the r x r traces in float64); everything it does per module is timed.
* **dense** (IBM SafeLoRA ``projected_weighted``, the paper's reference): C = V V^T / ||V||_F is
  materialised (d_out x d_out, float32) and precomputed per module as the paper keeps it in
  memory; timed is what it does per adapter module: W = C @ B, fW = W @ A and ori = B @ A (two
  d_out x d_in products) and the cosine over the flattened matrices (``.item()`` included).

Parts (all in ``benchmarks/results/projection_speed.json`` and ``projection_speed.png``):

1. **suites** (ranks 8, 16, 64): ``llama2-7b-qv`` (64 modules 4096x4096), ``llama3-8b-qv``
   (32 q_proj 4096x4096 + 32 grouped-query v_proj 1024x4096), ``llama2-7b-all`` (q,k,v,o
   4096x4096, gate/up 11008x4096, down 4096x11008; 32 layers = 224 modules). Only a few modules
   per DISTINCT SHAPE are timed (``--modules-per-shape`` x ``--repeats`` samples per path); the
   per-adapter total is sum over the suite's shapes of (module count x per-shape median). It
   is an extrapolation, not a timed pass over 224 modules; output and JSON say so.
2. **growth**: square d in 512 .. 8192 x each rank, both paths; log-log plot.
3. **accuracy** vs float64 for one module per suite (C B relative error, |cosine error|).
4. **CUDA**: if ``torch.cuda.is_available()``, part 1 again on the GPU (timed with
   ``torch.cuda.synchronize``), reported separately; otherwise the JSON records that there was none.
5. **decision parity** of the bank dtypes against the dense float64 reference (Safe LoRA's selections).
6. **load path** (``--no-load-path`` skips it): ``benchmarks/load_path.py``'s stages of the plugin's
   load beside vLLM's own load of the same Llama-2-7B-shaped adapters, in the same run.

No SVD is computed. Each alignment matrix is *built from* its SVD: V = U diag(s) Q^T with
Haar-random orthonormal U, Q (float64 QR of a Gaussian, cached on disk under ``--cache-dir``
keyed by shape and seed) and a decaying full-rank spectrum s_i = exp(-8 i / k), k = min(d_out,
d_in). The bank the fast path gets is then exactly what ``build_bank``'s full float64 SVD
stores (U rounded to float32, all k directions: the slowest fast-path case; truncation only
makes it faster), the dense side gets V rounded to float32 (as the reference computes V), and
the float64 ground truth is known in closed form. The other timed modules of a shape are row
permutations of the first (P V has the SVD (P U) s Q^T and dense C P C P^T), so each has its
own memory. Sweep-only shapes (no accuracy measured) use a Kronecker product of two Haar
matrices as U (exactly orthonormal and dense, no QR) and C formed from the factors in float32:
GEMM time does not depend on the values. Before each timed call a 64 MiB buffer (2x L3) is
rewritten: a real adapter walks 64-224 different modules, so the bank's U / C are never hot.

    python benchmarks/projection_speed.py                     # full (~5-15 min on 2 shared cores)
    python benchmarks/projection_speed.py --wait-quiet 20     # first wait (<= 20 min) for load1 < 1
    python benchmarks/projection_speed.py --quick             # < 1 minute smoke run (dims / 8)
    python benchmarks/projection_speed.py --plot-only benchmarks/results/projection_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine_info, print_table
from vllm_safelora.projection import ModuleInput, ProjectionKind, Subspace, analyze_module, analyze_modules

KIND = ProjectionKind.APPROX  # the paper's default and its headline numbers

# name -> [(module, d_out, d_in, count)]; count = modules of that kind in the adapter.
SUITES: dict[str, dict] = {
    "llama2-7b-qv": {
        "what": "Llama-2-7B q_proj + v_proj, 32 layers (the paper's setting)",
        "modules": [("q_proj", 4096, 4096, 32), ("v_proj", 4096, 4096, 32)],
        "accuracy_module": "v_proj",
    },
    "llama3-8b-qv": {
        "what": "Llama-3-8B q_proj + grouped-query v_proj, 32 layers",
        "modules": [("q_proj", 4096, 4096, 32), ("v_proj", 1024, 4096, 32)],
        "accuracy_module": "v_proj",
    },
    "llama2-7b-all": {
        "what": "Llama-2-7B all seven linear modules, 32 layers",
        "modules": [
            ("q_proj", 4096, 4096, 32),
            ("k_proj", 4096, 4096, 32),
            ("v_proj", 4096, 4096, 32),
            ("o_proj", 4096, 4096, 32),
            ("gate_proj", 11008, 4096, 32),
            ("up_proj", 11008, 4096, 32),
            ("down_proj", 4096, 11008, 32),
        ],
        "accuracy_module": "gate_proj",
    },
}
QUICK_DIVISOR = 8  # --quick divides every suite dimension by this
FLUSH_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
NO_CUDA_NOTE = "no CUDA device in this run"
BANK_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "vllm_safelora_bench_cache"


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES))
    p.add_argument("--ranks", nargs="+", type=int, default=None, help="LoRA ranks (default 8 16 64)")
    p.add_argument(
        "--modules-per-shape", type=int, default=None, help="distinct modules timed per shape (default 4; quick 2)"
    )
    p.add_argument("--repeats", type=int, default=None, help="passes over those modules (default 5; quick 2)")
    p.add_argument(
        "--sweep-dims",
        nargs="*",
        type=int,
        default=None,
        help="square d of the growth sweep (default 512 1024 2048 4096 8192; quick 128..1024); "
        "give none to skip the sweep",
    )
    p.add_argument(
        "--sweep-dense-max",
        type=int,
        default=None,
        help="largest sweep d that also runs the dense path (default 8192; quick 512)",
    )
    p.add_argument(
        "--bank-dtypes",
        nargs="+",
        choices=list(BANK_DTYPES),
        default=["bfloat16", "float32"],
        help="storage dtypes of the (untruncated) bank the fast path uses; the first is the headline",
    )
    p.add_argument(
        "--parity-seeds", type=int, default=None, help="adapters of the decision-parity check (default 40; quick 8)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 with --clock cpu, else torch's own)",
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu (default): the calling thread's CPU time with 1 torch thread, which other processes "
        "on a shared machine barely disturb; wall: perf_counter with torch's threads",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the float64 orthonormal factors are cached (default %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the factor cache")
    p.add_argument("--no-flush", action="store_true", help="do not evict caches before each timed call")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA part even if a GPU is present")
    p.add_argument(
        "--no-load-path",
        action="store_true",
        help="skip the load-path table (benchmarks/load_path.py's stages beside vLLM's own load)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="first wait up to MINUTES for the 1-minute load average to drop below --quiet-load "
        "(polled every 30 s; the polls are recorded)",
    )
    p.add_argument("--quiet-load", type=float, default=1.0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/projection_speed.json; quick: projection_speed_quick.json)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run, all dimensions / 8 (< 1 minute)")
    p.add_argument(
        "--plot-only",
        type=Path,
        default=None,
        metavar="RESULT.json",
        help="print the tables of a saved result and redraw its PNG",
    )
    return p


def resolve_defaults(a: argparse.Namespace) -> argparse.Namespace:
    q = a.quick
    a.ranks = a.ranks or [8, 16, 64]
    a.modules_per_shape = a.modules_per_shape or (2 if q else 4)
    a.repeats = a.repeats or (2 if q else 5)
    a.parity_seeds = a.parity_seeds or (8 if q else 40)
    if a.sweep_dims is None:
        a.sweep_dims = [128, 256, 512, 1024] if q else [512, 1024, 2048, 4096, 8192]
    if a.sweep_dense_max is None:
        a.sweep_dense_max = 512 if q else 8192
    a.out = a.out or (RESULTS_DIR / ("projection_speed_quick.json" if q else "projection_speed.json"))
    return a


def suite_modules(name: str, quick: bool) -> list[tuple[str, int, int, int]]:
    div = QUICK_DIVISOR if quick else 1
    return [(m, d_out // div, d_in // div, n) for m, d_out, d_in, n in SUITES[name]["modules"]]


# --------------------------------------------------------------------------- building banks


def spectrum(k: int) -> torch.Tensor:
    """Decaying, full-rank singular values (float64): 1 .. e^-8."""
    return torch.exp(-8.0 * torch.arange(k, dtype=torch.float64) / k)


def haar_orthonormal(n: int, k: int, seed: int, cache: Path | None) -> tuple[torch.Tensor, bool]:
    """n x k float64 matrix with orthonormal columns, Haar-distributed; (tensor, from_cache)."""
    path = cache / f"orth_{n}x{k}_seed{seed}.pt" if cache is not None else None
    if path is not None and path.exists():
        try:
            return torch.load(path), True
        except (RuntimeError, EOFError, OSError, ValueError):  # a damaged cache file
            path.unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    Q *= torch.sign(torch.diagonal(R)).unsqueeze(0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(Q, tmp)
        os.replace(tmp, path)
    return Q, False


def kron_orthonormal(d: int, seed: int) -> torch.Tensor | None:
    """d x d orthogonal matrix as kron(H_a, H_b), a * b = d, a <= b; None if d has no useful split."""
    a = max((x for x in range(2, math.isqrt(d) + 1) if d % x == 0), default=None)
    if a is None:
        return None
    Ha, _ = haar_orthonormal(a, a, seed, None)
    Hb, _ = haar_orthonormal(d // a, d // a, seed + 1, None)
    return torch.kron(Ha, Hb)


@dataclass
class ShapeJob:
    d_out: int
    d_in: int
    ranks: list[int]
    dense: bool
    faithful: bool  # built with Haar factors, dense C from float32 V, accuracy measured
    roles: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.d_out}x{self.d_in}"


def plan_jobs(args: argparse.Namespace) -> list[ShapeJob]:
    jobs: dict[tuple[int, int], ShapeJob] = {}
    for suite in args.suites:
        for mod, d_out, d_in, _n in suite_modules(suite, args.quick):
            j = jobs.setdefault((d_out, d_in), ShapeJob(d_out, d_in, list(args.ranks), True, True))
            j.roles.append(f"{suite}:{mod}")
    for d in args.sweep_dims:
        dense = d <= args.sweep_dense_max
        j = jobs.get((d, d))
        if j is None:
            jobs[(d, d)] = ShapeJob(d, d, list(args.ranks), dense, False, [f"sweep:{d}"])
        else:
            j.dense = j.dense or dense
            j.roles.append(f"sweep:{d}")
    return sorted(jobs.values(), key=lambda j: j.d_out * j.d_in)


@dataclass
class Prepared:
    """One shape's bank, both forms, for ``modules_per_shape`` distinct modules (CPU tensors)."""

    job: ShapeJob
    subs: dict[str, list[Subspace]]  # fast path per bank dtype: U views of one (n, d_out, k) stack, S, ||V||
    Cs: list[torch.Tensor] | None  # dense path: materialised C (float32)
    U64: torch.Tensor | None  # float64 truth of module 0 (faithful jobs only)
    w64: torch.Tensor | None  # s^2 / ||s||, float64
    build: dict


def prepare(job: ShapeJob, n_modules: int, args: argparse.Namespace) -> Prepared:
    d_out, d_in = job.d_out, job.d_in
    k = min(d_out, d_in)
    s64 = spectrum(k)
    norm = float(torch.linalg.vector_norm(s64))
    w64 = s64 * s64 / norm
    cache = None if args.no_cache else args.cache_dir
    build: dict = {"k": k, "spectrum": "s_i = exp(-8 i / k), i < k (full rank)"}
    t0 = time.perf_counter()
    U64 = C = None
    if job.faithful:
        U64, hit_u = haar_orthonormal(d_out, k, 4 * args.seed + 0, cache)
        Q64, hit_q = haar_orthonormal(d_in, k, 4 * args.seed + 1, cache)
        build["factors"] = "Haar (float64 QR), " + ("from cache" if hit_u and hit_q else "computed")
        build["factors_seconds"] = time.perf_counter() - t0
        U32 = U64.float()
        if job.dense:
            t0 = time.perf_counter()
            V = ((U64 * s64) @ Q64.T).float()  # the float32 V the reference computes
            build["V_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            C = torch.mm(V, V.t()) / torch.norm(V)  # the paper's line, float32
            build["dense_C_seconds"] = time.perf_counter() - t0
            del V
        del Q64
    else:
        U = kron_orthonormal(d_out, args.seed) if d_out == d_in else None
        if U is None:
            U, _ = haar_orthonormal(d_out, k, 4 * args.seed + 0, cache)
            build["factors"] = "Haar (float64 QR)"
        else:
            build["factors"] = "Kronecker product of two Haar matrices (timing only)"
        U32 = U.float()
        del U
        build["factors_seconds"] = time.perf_counter() - t0
        if job.dense:
            t0 = time.perf_counter()
            C = (U32 * w64.float()) @ U32.T  # = V V^T / ||V||, formed from the factors
            build["dense_C_seconds"] = time.perf_counter() - t0
    S32 = s64.float()
    gen = torch.Generator().manual_seed(args.seed + 7919)
    perms = [torch.arange(d_out) if j == 0 else torch.randperm(d_out, generator=gen) for j in range(n_modules)]
    Cs = (
        [C if j == 0 else C.index_select(0, p).index_select(1, p) for j, p in enumerate(perms)]
        if C is not None
        else None
    )
    subs: dict[str, list[Subspace]] = {}
    for name in args.bank_dtypes:
        # Side by side in one tensor, as bank.load stores a shape's U's (what the batched scorer reads).
        stack = torch.empty((n_modules, d_out, k), dtype=BANK_DTYPES[name])
        for j, p in enumerate(perms):
            stack[j].copy_(U32[p])
        subs[name] = [Subspace(U=stack[j], S=S32, frobenius_norm=norm) for j in range(n_modules)]
    return Prepared(job, subs, Cs, U64, w64 if U64 is not None else None, build)


def make_lora(d_out: int, d_in: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(r, d_in, generator=gen) / d_in**0.5
    B = torch.randn(d_out, r, generator=gen) * 0.01
    return A.contiguous(), B.contiguous()


# --------------------------------------------------------------------------- the timed paths


def fast_score(sub: Subspace, A: torch.Tensor, B: torch.Tensor):
    """Scoring only: X = U^T B (one pass over U) and the r x r traces; what every module costs."""
    return analyze_module("m", sub, A, B, 2.0, KIND)


def fast_project(analysis) -> torch.Tensor:
    """C B = U (w X): the second pass, only for modules the policy changes."""
    return analysis.projected_B


def fast_batched(subs: list[Subspace], loras: list[tuple[torch.Tensor, torch.Tensor]]):
    """Every module of the shape in one analyze_modules call (one batched product over the stack)."""
    return analyze_modules([ModuleInput(f"m{j}", s, A, B, 2.0) for j, (s, (A, B)) in enumerate(zip(subs, loras))], KIND)


def fast_path(sub: Subspace, A: torch.Tensor, B: torch.Tensor):
    a = fast_score(sub, A, B)
    return fast_project(a), a.score.cosine


def dense_path(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    W = torch.mm(C, B)
    fW = torch.mm(W, A)
    ori = torch.mm(B, A)
    cos = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item()
    return W, cos


class Timer:
    def __init__(self, device: str, flush: bool, clock: str = "wall"):
        self.device = device
        self.cuda = device.startswith("cuda")
        # CUDA work runs on the device: only wall time (with synchronize) measures it.
        self.now = time.thread_time if clock == "cpu" and not self.cuda else time.perf_counter
        self.buf = torch.zeros(FLUSH_BYTES["cuda" if self.cuda else "cpu"] // 4, device=device) if flush else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, *args, flush: bool = True) -> tuple[float, object]:
        if self.buf is not None and flush:
            self.buf.add_(1.0)  # rewrite 2x the last-level cache: the bank's U / C are cold
        self.sync()
        t0 = self.now()
        out = fn(*args)
        self.sync()
        return self.now() - t0, out


def peak_read_bandwidth(device: str, clock: str, nbytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes/s of the fastest full read of a large float32 buffer (torch.sum), with the same threads and
    clock as the timed paths: the roof for one pass over U."""
    x = torch.ones(nbytes // 4, device=device)
    timer = Timer(device, flush=False, clock=clock)
    best = min(timer(lambda: x.sum().item())[0] for _ in range(repeats))
    return nbytes / best


# --------------------------------------------------------------------------- accuracy


def accuracy(prep: Prepared, A: torch.Tensor, B: torch.Tensor, device: str) -> dict:
    """Module 0 against the float64 truth C = U diag(s^2/||s||) U^T (known in closed form)."""
    A64, B64 = A.double(), B.double()
    W64 = prep.U64 @ (prep.w64.unsqueeze(1) * (prep.U64.T @ B64))
    ori = (B64 @ A64).reshape(1, -1)
    cos64 = torch.nn.functional.cosine_similarity((W64 @ A64).reshape(1, -1), ori).item()
    del ori
    nW = float(torch.linalg.norm(W64))

    def rel(x: torch.Tensor) -> float:
        return float(torch.linalg.norm(x.cpu().double() - W64) / nW)

    dev = torch.device(device)
    out: dict = {"cosine_float64": cos64}
    for dtype, subs in prep.subs.items():
        fB, fcos = fast_path(_to(subs[0], dev), A.to(dev), B.to(dev))
        out[f"fast-{dtype}"] = {"cb_rel_err": rel(fB), "cosine": fcos, "cosine_abs_err": abs(fcos - cos64)}
    if prep.Cs is not None:
        dB, dcos = dense_path(prep.Cs[0].to(dev), A.to(dev), B.to(dev))
        out["dense"] = {"cb_rel_err": rel(dB), "cosine": dcos, "cosine_abs_err": abs(dcos - cos64)}
    return out


def _to(sub: Subspace, dev: torch.device) -> Subspace:
    if sub.U.device == dev:
        return sub
    return Subspace(
        U=sub.U.to(dev), S=sub.S.to(dev), frobenius_norm=sub.frobenius_norm, numerical_rank=sub.numerical_rank
    )


def _on(subs: list[Subspace], dev: torch.device) -> list[Subspace]:
    """The subspaces on ``dev``, still views of one stack (so the batched scorer reads it without a copy)."""
    if subs[0].U.device == dev:
        return subs
    stack = torch.stack([s.U for s in subs]).to(dev)
    return [Subspace(U=stack[j], S=s.S.to(dev), frobenius_norm=s.frobenius_norm) for j, s in enumerate(subs)]


# --------------------------------------------------------------------------- timing one shape


def _stats(samples: list[float], prefix: str) -> dict:
    return {
        f"{prefix}_ms_median": statistics.median(samples) * 1e3,
        f"{prefix}_ms_min": min(samples) * 1e3,
        f"{prefix}_ms": [t * 1e3 for t in samples],
    }


def time_shape(
    prep: Prepared, device: str, args: argparse.Namespace, accuracy_ranks: bool, bandwidth: float
) -> list[dict]:
    job = prep.job
    dev = torch.device(device)
    subs = {dtype: _on(lst, dev) for dtype, lst in prep.subs.items()}
    Cs = [c.to(dev) for c in prep.Cs] if prep.Cs is not None else None
    timer = Timer(device, not args.no_flush, args.clock)
    gen = torch.Generator().manual_seed(args.seed * 1000 + job.d_out + job.d_in)
    rows = []
    n = len(Cs) if Cs is not None else len(next(iter(subs.values())))
    calls_per_rep = n * (2 * len(subs) + (1 if Cs is not None else 0)) + len(subs)
    bar = tqdm(
        total=len(job.ranks) * args.repeats * calls_per_rep,
        unit="call",
        desc=f"{device} {job.key}" + ("" if Cs is not None else " (fast only)"),
        leave=False,
    )
    for r in job.ranks:
        loras = [make_lora(job.d_out, job.d_in, r, gen) for _ in range(n)]
        loras_dev = [(A.to(dev), B.to(dev)) for A, B in loras]
        # warm-up: allocator, thread pool, BLAS kernel selection, CUDA context
        for lst in subs.values():
            fast_path(lst[0], *loras_dev[0])
            fast_batched(lst, loras_dev)
        if Cs is not None:
            dense_path(Cs[0], *loras_dev[0])
        score_t: dict[str, list[float]] = {d: [] for d in subs}
        cb_t: dict[str, list[float]] = {d: [] for d in subs}
        batch_t: dict[str, list[float]] = {d: [] for d in subs}
        dense_t: list[float] = []
        for _rep in range(args.repeats):
            for j in range(n):
                A, B = loras_dev[j]
                for dtype, lst in subs.items():
                    t, a = timer(fast_score, lst[j], A, B)
                    score_t[dtype].append(t)
                    t, _ = timer(fast_project, a)
                    cb_t[dtype].append(t)
                    bar.update(2)
                if Cs is not None:
                    dense_t.append(timer(dense_path, Cs[j], A, B)[0])
                    bar.update(1)
            for dtype, lst in subs.items():
                batch_t[dtype].append(timer(fast_batched, lst, loras_dev)[0] / n)
                bar.update(1)
        row = {
            "device": device,
            "d_out": job.d_out,
            "d_in": job.d_in,
            "rank": r,
            "k": prep.build["k"],
            "roles": job.roles,
            "samples_per_path": len(dense_t) or len(next(iter(score_t.values()))),
            "fast": {},
        }
        dense_med = statistics.median(dense_t) if dense_t else None
        if dense_t:
            row.update(_stats(dense_t, "dense"))
        for dtype, lst in subs.items():
            u_bytes = job.d_out * prep.build["k"] * lst[0].U.element_size()
            f = {**_stats(score_t[dtype], "score"), **_stats(cb_t[dtype], "cb"), **_stats(batch_t[dtype], "batched")}
            score_med = statistics.median(score_t[dtype])
            total = [s + c for s, c in zip(score_t[dtype], cb_t[dtype])]
            f.update(_stats(total, "score_and_cb"))
            f["bank_U_bytes"] = u_bytes
            f["bandwidth_fraction_score"] = (u_bytes / score_med) / bandwidth
            f["bandwidth_fraction_batched"] = (u_bytes / statistics.median(batch_t[dtype])) / bandwidth
            if dense_med is not None:
                f["ratio_score"] = dense_med / score_med
                f["ratio_batched"] = dense_med / statistics.median(batch_t[dtype])
                f["ratio_score_and_cb"] = dense_med / statistics.median(total)
            row["fast"][dtype] = f
        if accuracy_ranks and prep.U64 is not None:
            row["accuracy_vs_float64"] = accuracy(prep, *loras[0], device)
        rows.append(row)
    bar.close()
    del subs, Cs, timer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- aggregation


def summarise_suites(shape_rows: list[dict], args: argparse.Namespace, device: str) -> list[dict]:
    """Per suite, rank and bank dtype: ms/module (module-weighted per-shape medians) and dense / fast."""
    by = {(r["d_out"], r["d_in"], r["rank"]): r for r in shape_rows if r["device"] == device}
    out = []
    for suite in args.suites:
        mods = suite_modules(suite, args.quick)
        acc_mod = SUITES[suite]["accuracy_module"]
        for r in args.ranks:
            rows = [(m, n, by.get((d_out, d_in, r))) for m, d_out, d_in, n in mods]
            if any(x is None or "dense_ms_median" not in x for _, _, x in rows):
                continue
            count = sum(n for _, n, _ in rows)
            dense_ms = sum(n * x["dense_ms_median"] for _, n, x in rows) / count
            acc_row = next(x for m, _, x in rows if m == acc_mod)
            entry = {
                "device": device,
                "suite": suite,
                "rank": r,
                "modules": count,
                "dense_ms_per_module": dense_ms,
                "dense_s_per_adapter": dense_ms * count / 1e3,
                "fast": {},
                "accuracy_module": f"{acc_mod} {acc_row['d_out']}x{acc_row['d_in']}",
                "accuracy_vs_float64": acc_row.get("accuracy_vs_float64"),
            }
            for dtype in args.bank_dtypes:
                per = {}
                for what in ("score", "batched", "score_and_cb"):
                    ms = sum(n * x["fast"][dtype][f"{what}_ms_median"] for _, n, x in rows) / count
                    per[f"{what}_ms_per_module"] = ms
                    per[f"ratio_{what}"] = dense_ms / ms
                u_bytes = sum(n * x["fast"][dtype]["bank_U_bytes"] for _, n, x in rows)
                per["bandwidth_fraction_score"] = (
                    u_bytes / (per["score_ms_per_module"] * count / 1e3)
                ) / args.bandwidths[device]
                per["bandwidth_fraction_batched"] = (
                    u_bytes / (per["batched_ms_per_module"] * count / 1e3)
                ) / args.bandwidths[device]
                per["score_s_per_adapter"] = per["score_ms_per_module"] * count / 1e3
                entry["fast"][dtype] = per
            out.append(entry)
    return out


def sweep_rows(shape_rows: list[dict], args: argparse.Namespace) -> list[dict]:
    dims = set(args.sweep_dims)
    head = args.bank_dtypes[0]
    out = []
    for r in shape_rows:
        if r["device"] != "cpu" or r["d_out"] != r["d_in"] or r["d_out"] not in dims:
            continue
        fast = r["fast"][head]["score_ms_median"]
        dense = r.get("dense_ms_median")
        out.append(
            {
                "d_out": r["d_out"],
                "rank": r["rank"],
                "fast_ms_median": fast,
                "dense_ms_median": dense,
                "ratio_of_medians": dense / fast if dense else None,
                "bank_dtype": head,
            }
        )
    return out


# --------------------------------------------------------------------------- decisions


PARITY_SHAPES = [(64, 128), (128, 128), (256, 128), (48, 32), (256, 256)]
PARITY_RANKS = [1, 2, 4, 8, 16]
PARITY_THRESHOLDS = [0.1, 0.2, 0.35, 0.5]
PARITY_TOPK = [1, 3, 6]


def decision_parity(seeds: int, dtypes: list[str]) -> dict:
    """Which modules Safe LoRA projects, bank in ``dtype`` (untruncated, float64 SVD rounded) vs the
    dense float64 reference, over ``seeds`` adapters of 12 mixed-shape modules, at several thresholds
    and top-k: the decisions must be identical; the largest |cosine error| is reported."""
    from vllm_safelora.projection import round_cosine, select_modules

    mismatches = {d: [] for d in dtypes}
    max_err = {d: 0.0 for d in dtypes}
    decisions = 0
    for seed in tqdm(range(seeds), desc="decision parity", unit="adapter", leave=False):
        gen = torch.Generator().manual_seed(10_000 + seed)
        truth: dict[str, float] = {}
        fast: dict[str, dict[str, float]] = {d: {} for d in dtypes}
        for i in range(12):
            d_out, d_in = PARITY_SHAPES[i % len(PARITY_SHAPES)]
            r = PARITY_RANKS[i % len(PARITY_RANKS)]
            k = min(d_out, d_in)
            tau = float(torch.empty(1).uniform_(2.0, 0.6 * k, generator=gen))
            S = 0.05 + torch.exp(-torch.arange(k, dtype=torch.float64) / tau)
            U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=torch.float64))
            norm = float(torch.linalg.vector_norm(S))
            A = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
            lean = float(torch.rand(1, generator=gen)) * 3.0
            top = U[:, : max(1, k // 8)]
            B = (
                torch.randn(d_out, r, generator=gen, dtype=torch.float64)
                + lean * top @ torch.randn(top.shape[1], r, generator=gen, dtype=torch.float64)
            ) * 0.01
            A32, B32 = A.float(), B.float()
            C = U @ torch.diag(S * S / norm) @ U.T  # the dense float64 reference on the float32 adapter
            dW = B32.double() @ A32.double()
            cos = torch.nn.functional.cosine_similarity((C @ dW).reshape(1, -1), dW.reshape(1, -1)).item()
            truth[f"m{i}"] = cos
            for d in dtypes:
                sub = Subspace(U=U.to(BANK_DTYPES[d]), S=S.float(), frobenius_norm=norm)
                c = analyze_module(f"m{i}", sub, A32, B32, 1.0, KIND).score.cosine
                fast[d][f"m{i}"] = c
                max_err[d] = max(max_err[d], abs(c - cos))
        rounded_truth = {n: round_cosine(c) for n, c in truth.items()}
        cases = [("threshold", t, None) for t in PARITY_THRESHOLDS] + [("topk", None, k) for k in PARITY_TOPK]
        for mode, t, k in cases:
            want = select_modules(rounded_truth, mode, threshold=t, topk=k)
            decisions += 1
            for d in dtypes:
                got = select_modules({n: round_cosine(c) for n, c in fast[d].items()}, mode, threshold=t, topk=k)
                if got != want:
                    mismatches[d].append(
                        {
                            "seed": seed,
                            "mode": mode,
                            "threshold": t,
                            "topk": k,
                            "only_fast": sorted(got - want),
                            "only_reference": sorted(want - got),
                        }
                    )
    return {
        "adapters": seeds,
        "modules_per_adapter": 12,
        "selections_per_dtype": decisions,
        "thresholds": PARITY_THRESHOLDS,
        "topk": PARITY_TOPK,
        "per_dtype": {
            d: {
                "mismatched_selections": len(mismatches[d]),
                "examples": mismatches[d][:5],
                "max_cosine_abs_err": max_err[d],
            }
            for d in dtypes
        },
    }


# --------------------------------------------------------------------------- driver


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def wait_quiet(minutes: float, below: float) -> dict:
    polls = []
    deadline = time.monotonic() + minutes * 60
    while True:
        la = loadavg()
        polls.append({"t": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg": la})
        if la is None or la[0] < below:
            return {"waited_minutes_max": minutes, "threshold": below, "quiet": True, "polls": polls}
        if time.monotonic() >= deadline:
            return {"waited_minutes_max": minutes, "threshold": below, "quiet": False, "polls": polls}
        print(f"waiting for a quiet machine: load {la} (need 1-min < {below})", flush=True)
        time.sleep(30)


def run(args: argparse.Namespace) -> dict:
    if args.threads is None and args.clock == "cpu":
        args.threads = 1  # thread_time sees only this thread's work
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet = wait_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet > 0 else None
    info = machine_info()
    info["torch_interop_threads"] = torch.get_num_interop_threads()
    info["load_average_at_start"] = loadavg()
    cuda = torch.cuda.is_available() and not args.no_cuda
    devices = ["cpu"] + (["cuda"] if cuda else [])
    if cuda:
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}, "
        f"{info['torch_threads']} threads, load {info['load_average_at_start']}; devices {devices}"
    )
    args.bandwidths = {d: peak_read_bandwidth(d, args.clock) for d in devices}
    info["peak_read_bandwidth_GBps"] = {d: round(bw / 1e9, 2) for d, bw in args.bandwidths.items()}
    print(
        f"clock: {args.clock} ({torch.get_num_threads()} torch threads); peak read bandwidth (torch.sum over 512 MiB "
        "float32, best of 7): " + ", ".join(f"{d} {bw / 1e9:.1f} GB/s" for d, bw in args.bandwidths.items())
    )
    jobs = plan_jobs(args)
    print(f"{len(jobs)} distinct shapes: " + ", ".join(j.key + ("" if j.dense else " (fast only)") for j in jobs))
    print(
        f"timing {args.modules_per_shape} modules x {args.repeats} repeats per shape, rank and path; "
        "per-adapter totals = sum(count x per-shape median)"
    )
    shape_rows: list[dict] = []
    builds: dict[str, dict] = {}
    load_samples = []
    for job in tqdm(jobs, desc="shapes", unit="shape"):
        load_samples.append({"shape": job.key, "loadavg": loadavg()})
        t0 = time.perf_counter()
        prep = prepare(job, args.modules_per_shape, args)
        prep.build["prepare_seconds"] = time.perf_counter() - t0
        builds[job.key] = prep.build
        for device in devices:
            if device != "cpu" and not job.faithful:
                continue  # CUDA: the suites only
            shape_rows.extend(
                time_shape(prep, device, args, accuracy_ranks=job.faithful, bandwidth=args.bandwidths[device])
            )
        del prep
    info["load_average_at_end"] = loadavg()
    info["load_samples"] = load_samples
    results = {
        "shapes": shape_rows,
        "suites": {d: summarise_suites(shape_rows, args, d) for d in devices},
        "sweep": sweep_rows(shape_rows, args),
        "decision_parity": decision_parity(args.parity_seeds, args.bank_dtypes),
    }
    if not args.no_load_path:
        # The load-path table in the same run: the plugin's stages and vLLM's own load of the same files.
        from benchmarks import load_path

        results["load_path"] = load_path.measure(
            ["llama2-7b-qv-r16"] if args.quick else list(load_path.SUITES), quick=args.quick
        )
    if not cuda:
        results["cuda"] = {"available": False, "note": NO_CUDA_NOTE if not args.no_cuda else "skipped (--no-cuda)"}
    else:
        results["cuda"] = {"available": True, "device": info["cuda_device"]}
    return {
        "benchmark": "projection_speed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "bandwidths"},
        "machine": info,
        "wait_quiet": quiet,
        "builds": builds,
        "notes": [
            (
                "fast = vllm_safelora.projection (kind approx) with the full bank (k = min(d_out, d_in) directions, "
                f"no truncation) stored as {', '.join(args.bank_dtypes)}: 'score' = analyze_module, X = U^T B in one "
                "pass over U (a reduced-precision U is read in blocks into a float32 buffer) and float64 r x r traces; "
                "'C B' = the projected lora_B U (w X), a second pass, only for modules a policy changes; 'batched' = "
                "analyze_modules over all timed modules of the shape at once (one batched product over the stacked "
                "U's, as bank.load stores them), per module."
            ),
            (
                "bandwidth fraction = bytes of U / scoring time / peak read bandwidth (torch.sum over 512 MiB "
                "float32, best of 7, same run): how close one pass over U gets to the memory roof."
            ),
            (
                "decision parity: Safe LoRA's selected modules (thresholds and top-k, cosines rounded to 5 decimals "
                "as the reference) with each bank dtype vs the dense float64 reference, on adapters of 12 mixed-shape "
                "modules built like tests/test_projection_parity.py."
            ),
            (
                "dense = the paper's reference: C = V V^T / ||V|| (float32) precomputed per module and not timed; "
                "timed: C @ B, (C B) @ A, B @ A and cosine_similarity over the flattened d_out x d_in matrices."
            ),
            (
                f"per distinct shape, {args.modules_per_shape} modules (row permutations of one V, each its own "
                f"memory, own lora_A / lora_B) x {args.repeats} repeats are timed per path and rank; fast and dense "
                "calls alternate; a 64 MiB buffer is rewritten before every timed call (cold caches)"
                + (" [disabled: --no-flush]" if args.no_flush else "")
                + "."
            ),
            (
                "per-adapter totals are sum over the suite's shapes of (module count x per-shape median): "
                "an extrapolation from those samples, not a timed pass over every module. For suites with "
                "several shapes, ms/module = total / modules (module-weighted mean of per-shape medians)."
            ),
            (
                "no SVD is computed: V = U diag(s) Q^T is built from Haar-random orthonormal U, Q (float64 QR, cached "
                "on disk) and s_i = exp(-8 i / k); the fast path gets U rounded to float32 (what build_bank's float64 "
                "SVD stores), the dense path V rounded to float32, and the float64 truth is U diag(s^2/||s||) U^T."
            ),
            (
                "sweep-only shapes: U = kron(H_a, H_b) of two Haar matrices (exactly orthonormal, dense) and C formed "
                "from the factors in float32; timing only (GEMM time does not depend on the values)."
            ),
            (
                "accuracy: module 0 of the suite's accuracy module's shape, |cos error| is against the unrounded "
                "float64 cosine of the flattened matrices (per bank dtype)."
            ),
            (
                f"clock: {args.clock}. cpu = time.thread_time of the calling thread with 1 torch thread (both paths "
                "alike): on this shared 2-vCPU machine, wall time under other load varies several-fold, CPU time of "
                "one thread far less (it still shares memory bandwidth and caches). wall = perf_counter with "
                "torch's threads (what a quiet machine gives)."
            ),
            (
                "load path: benchmarks/load_path.py's measure() in this process (its own docstring says what each "
                "stage is; wall time of perf_counter around each call, median, warm page cache)."
            ),
            "the machine is shared (2 vCPUs): see machine.load_average_* and load_samples.",
        ],
        "results": results,
    }


# --------------------------------------------------------------------------- report


def print_report(rep: dict) -> None:
    res = rep["results"]
    for device, suites in res["suites"].items():
        print(f"\n== suites on {device}: ms per module (per-shape medians, module-weighted), dense / fast ==")
        rows = []
        for s in suites:
            for dtype, f in s["fast"].items():
                rows.append(
                    [
                        s["suite"],
                        s["rank"],
                        s["modules"],
                        dtype,
                        f"{f['score_ms_per_module']:.2f}",
                        f"{f['batched_ms_per_module']:.2f}",
                        f"{f['score_and_cb_ms_per_module']:.2f}",
                        f"{s['dense_ms_per_module']:.1f}",
                        f"{f['ratio_score']:.1f}x",
                        f"{f['ratio_batched']:.1f}x",
                        f"{f['ratio_score_and_cb']:.1f}x",
                        f"{f['bandwidth_fraction_score']:.0%}",
                    ]
                )
        print_table(
            [
                "suite",
                "r",
                "modules",
                "bank",
                "score",
                "batched",
                "score+CB",
                "dense",
                "dense/score",
                "dense/batched",
                "dense/(score+CB)",
                "BW frac",
            ],
            rows,
        )
    print("\n== per shape (medians; min in brackets) ==")
    rows = []
    for r in res["shapes"]:
        for dtype, f in r["fast"].items():
            rows.append(
                [
                    r["device"],
                    f"{r['d_out']}x{r['d_in']}",
                    r["rank"],
                    dtype,
                    r["samples_per_path"],
                    f"{f['score_ms_median']:.2f} [{f['score_ms_min']:.2f}]",
                    f"{f['batched_ms_median']:.2f}",
                    f"{f['cb_ms_median']:.2f}",
                    f"{r['dense_ms_median']:.1f} [{r['dense_ms_min']:.1f}]" if "dense_ms_median" in r else "-",
                    f"{f['ratio_score']:.1f}x" if "ratio_score" in f else "-",
                    f"{f['bandwidth_fraction_score']:.0%}",
                ]
            )
    print_table(
        ["device", "shape", "r", "bank", "n", "score ms", "batched ms", "C B ms", "dense ms", "dense/score", "BW frac"],
        rows,
    )
    print("\n== accuracy vs float64, one module per suite ==")
    rows = []
    for device, suites in res["suites"].items():
        for s in suites:
            acc = s.get("accuracy_vs_float64")
            if not acc:
                continue
            for path, a in acc.items():
                if path == "cosine_float64":
                    continue
                rows.append(
                    [
                        device,
                        s["suite"],
                        s["accuracy_module"],
                        s["rank"],
                        path,
                        f"{a['cb_rel_err']:.1e}",
                        f"{acc['cosine_float64']:.6f}",
                        f"{a['cosine_abs_err']:.1e}",
                    ]
                )
    print_table(["device", "suite", "module", "r", "path", "C B rel err", "cos (f64)", "|cos err|"], rows)
    par = res.get("decision_parity")
    if par:
        print(
            f"\n== decision parity vs dense float64: {par['adapters']} adapters x "
            f"{par['selections_per_dtype'] // par['adapters']} selections =="
        )
        print_table(
            ["bank", "selections", "mismatched", "max |cos err|"],
            [
                [d, par["selections_per_dtype"], v["mismatched_selections"], f"{v['max_cosine_abs_err']:.1e}"]
                for d, v in par["per_dtype"].items()
            ],
        )
    if res.get("load_path"):
        from benchmarks import load_path

        load_path.print_report(res["load_path"])
    print("\ncuda: " + (res["cuda"].get("note") or res["cuda"].get("device", "")))
    m = rep["machine"]
    print(f"peak read bandwidth: {m.get('peak_read_bandwidth_GBps')} GB/s")
    print(f"load average: start {m.get('load_average_at_start')}, end {m.get('load_average_at_end')}")
    for note in rep["notes"]:
        print(f"note: {note}")


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["results"]["sweep"]
    if not rows:
        return
    ranks = sorted({r["rank"] for r in rows})
    colors = dict(zip(ranks, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for rk in ranks:
        pts = sorted((r for r in rows if r["rank"] == rk), key=lambda r: r["d_out"])
        ax.plot(
            [p["d_out"] for p in pts], [p["fast_ms_median"] for p in pts], "o-", color=colors[rk], label=f"fast r={rk}"
        )
        dp = [p for p in pts if p.get("dense_ms_median") is not None]
        ax.plot(
            [p["d_out"] for p in dp], [p["dense_ms_median"] for p in dp], "s--", color=colors[rk], label=f"dense r={rk}"
        )
        ax2.plot([p["d_out"] for p in dp], [p["ratio_of_medians"] for p in dp], "o-", color=colors[rk], label=f"r={rk}")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("d (square d x d module)")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per module (median)")
    ax.set_title("time per module: fast r x r path vs dense C (paper)")
    ax2.axhline(1.0, color="gray", lw=1, ls=":")
    ax2.set_ylabel("dense / fast (ratio of medians)")
    ax2.set_title("speed-up")
    m = rep["machine"]
    fig.suptitle(
        f"Safe LoRA projection, CPU: {m.get('cpu_model', '')[:30]}, {m.get('cpu_count')} vCPUs, "
        f"{m.get('torch_threads')} torch threads, load {m.get('load_average_at_start')} -> "
        f"{m.get('load_average_at_end')} (shared machine)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only is not None:
        rep = json.loads(args.plot_only.read_text())
        print_report(rep)
        plot(rep, args.plot_only.with_suffix(".png"))
        print(f"\nsaved {args.plot_only.with_suffix('.png')}")
        return 0
    args = resolve_defaults(args)
    t0 = time.perf_counter()
    rep = run(args)
    rep["wall_seconds"] = time.perf_counter() - t0
    print_report(rep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rep, indent=2) + "\n")
    os.replace(tmp, args.out)
    png = args.out.with_suffix(".png")
    plot(rep, png)
    print(f"\nsaved {args.out} and {png} ({rep['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
