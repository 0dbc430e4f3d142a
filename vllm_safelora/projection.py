"""Safe LoRA math (arXiv 2405.16833), in the fast r x r form.

Per target module the alignment matrix is V = W_aligned - W_base, kept as its
thin SVD V = U S Q^T. The two projections of the paper are then

    approx:  C     = V V^T / ||V||_F  = U diag(S^2 / ||S||_2) U^T   (paper default, not idempotent)
    exact:   C_hat = V (V^T V)^+ V^T  = U U^T                        (over non-zero singular values)

i.e. C = U diag(w) U^T. With dW = s B A, G = A A^T, H = B^T B (r x r) and the
coordinates X = U^T B (k x r, ONE pass over U), every Frobenius quantity the
paper uses is a trace of an r x r product, because U^T U = I (s cancels in every
ratio):

    ||dW||^2         = s^2 tr(H G)
    <C dW, dW>       = s^2 tr(X^T diag(w) X G)
    ||C dW||^2       = s^2 tr(X^T diag(w^2) X G)
    ||(C - I) dW||^2 = s^2 [tr(X^T diag((w-1)^2) X G) + tr((H - X^T X) G)]

The last line splits (C - I) B into its part inside span(U), U (w-1) X, and the
part outside, B - U X, whose Gram matrix is H - X^T X. Writing it this way
instead of ||C dW||^2 - 2 <C dW, dW> + ||dW||^2 avoids the cancellation when
C dW ~ dW (the exact kind on an update inside the subspace): the first term is
a sum of non-negative weighted squares. The second is a difference, but it is
exactly 0 when U spans every output direction (k = d_out, the untruncated bank
of a square or wide module) and is then skipped; for a truncated bank its
rounding error is ~eps(X's dtype) * ||dW||^2, i.e. the relative distance is
known to ~sqrt(eps) ~ 3e-4 absolute when it is below that (tests pin it
against the dense float64 reference).

C B = U (w X) (the projected lora_B) costs a second pass over U and is computed
only for modules a policy actually changes (:attr:`ModuleAnalysis.projected_B`).

Reduced-precision banks (bfloat16 / float16 U) are used as stored: U is read in
row blocks converted into a small float32 buffer (float32 accumulation), never
copied whole to float32. Modules with the same shapes are scored in one batched
product (:func:`analyze_modules`) over U's that the bank stores side by side.

X is float32 (float64 for a float64 U); the r x r algebra is float64, which
costs nothing at that size and makes the cosine exact to the data.

This module imports no vLLM and knows nothing about files.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping

import torch

# The reference implementation rounds the cosine with numpy.round(cos, 5)
# before comparing it with the threshold; selection must do the same to pick
# the same modules.
COSINE_DECIMALS = 5


class ProjectionKind(str, enum.Enum):
    APPROX = "approx"
    EXACT = "exact"


class SelectMode(str, enum.Enum):
    THRESHOLD = "threshold"
    TOPK = "topk"
    ALL = "all"


@dataclass(frozen=True)
class Subspace:
    """One module's alignment operator in SVD form.

    ``U`` holds the kept left singular vectors (d_out x k, any float dtype; it
    is used in float32), ``S`` the kept singular values (k), and
    ``frobenius_norm`` is ||V||_F of the *untruncated* V: the approximate C
    divides by it, so truncation must not change it.

    The approximate C uses every kept direction, however small: for an update
    nearly orthogonal to the head of the spectrum, the tail decides the
    cosine. The exact projection is defined over the non-zero singular values
    only, so directions beyond ``numerical_rank`` (float32 round-off) get weight 0.
    """

    U: torch.Tensor
    S: torch.Tensor
    frobenius_norm: float
    numerical_rank: int | None = None

    @property
    def d_out(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def weights(self, kind: ProjectionKind) -> torch.Tensor:
        """Diagonal of C in the U basis, float32 on U's device."""
        S = self.S.to(device=self.U.device, dtype=torch.float32)
        if ProjectionKind(kind) is ProjectionKind.EXACT:
            if self.numerical_rank is not None:
                keep = torch.arange(S.numel(), device=S.device) < self.numerical_rank
            else:
                # Same cut-off as torch.linalg.pinv: rtol = eps * max(shape).
                tol = float(S.max()) * max(self.U.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
                keep = tol < S
            return keep.to(torch.float32)
        if self.frobenius_norm <= 0.0:
            return torch.zeros_like(S)
        return S * S / self.frobenius_norm


# The float32 staging buffer for a reduced-precision U: about L2-sized blocks,
# so a bfloat16 bank costs one pass over its own bytes and no full float32 copy.
STAGING_BYTES = 1 << 20
# Batched scoring keeps X = U^T B of a whole batch (and its float64 copies);
# batches are cut so that this stays small whatever the adapter's rank.
BATCH_BYTES = 64 << 20


def _compute_dtype(U: torch.Tensor) -> torch.dtype:
    return torch.float64 if U.dtype == torch.float64 else torch.float32


def _staged_rows(U: torch.Tensor, dt: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
    """A reduced-precision U (d_out x k) in row blocks of about STAGING_BYTES, each converted
    into one reused ``dt`` buffer: one pass over U's own bytes, never a full ``dt`` copy."""
    d_out, k = U.shape
    rows = max(1, STAGING_BYTES // max(1, 4 * k))
    buf = torch.empty(min(rows, d_out), k, dtype=dt, device=U.device)
    for i in range(0, d_out, rows):
        j = min(d_out, i + rows)
        block = buf[: j - i]
        block.copy_(U[i:j])
        yield slice(i, j), block


def coordinates(U: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X = U^T B for a batch: U (n, d_out, k) in its stored dtype, B (n, d_out, r); one pass over U.

    Returns (n, k, r) in float32 (float64 for a float64 U) on U's device.
    """
    dt = _compute_dtype(U)
    B = B.to(device=U.device, dtype=dt)
    if U.dtype == dt:
        # (B^T U)^T rather than U^T B: the same product, several times faster on
        # CPU for small r (the transposed-operand GEMM path).
        return torch.bmm(B.transpose(1, 2), U).transpose(1, 2)
    # Module by module: row blocks spanning the whole batch would be a few rows deep,
    # and such thin products run far below the GEMM's speed.
    XT = torch.zeros(U.shape[0], B.shape[2], U.shape[2], dtype=dt, device=U.device)
    for m in range(U.shape[0]):
        for rows, block in _staged_rows(U[m], dt):
            XT[m].addmm_(B[m, rows].T, block)
    return XT.transpose(1, 2)


def expand(U: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """U @ Y for one module (U d_out x k in its stored dtype, Y k x r): the second pass, C B = U (w X)."""
    dt = _compute_dtype(U)
    Y = Y.to(device=U.device, dtype=dt)
    if U.dtype == dt:
        return U @ Y
    out = torch.empty(U.shape[0], Y.shape[1], dtype=dt, device=U.device)
    for rows, block in _staged_rows(U, dt):
        torch.mm(block, Y, out=out[rows])
    return out


def apply_operator(sub: Subspace, B: torch.Tensor, kind: ProjectionKind) -> torch.Tensor:
    """C @ B in float32 on the subspace's device (B is d_out x r): two passes over U."""
    if B.shape[0] != sub.d_out:
        raise ValueError(f"lora_B has {B.shape[0]} rows, the subspace has {sub.d_out}")
    if sub.rank == 0:
        return torch.zeros(B.shape, dtype=torch.float32, device=sub.U.device)
    X = coordinates(sub.U.unsqueeze(0), B.unsqueeze(0))[0]
    w = sub.weights(kind).to(X.dtype)
    return expand(sub.U, w.unsqueeze(1) * X).to(torch.float32)


@dataclass(frozen=True)
class ModuleScore:
    """What the paper measures for one module; every figure is scale-free or stated."""

    name: str
    cosine: float
    """cos(vec(C dW), vec(dW)), unrounded (float64 traces)."""
    cosine_rounded: float
    """``cosine`` rounded to 5 decimals: the value selection compares, as the reference does."""
    update_norm: float
    """||dW||_F including the LoRA scale s."""
    distance_B: float
    """||C B - B||_F on the raw lora_B: the reference's Pdst ingredient for modules it keeps."""
    relative_distance: float
    """||(C - I) dW||_F / ||dW||_F: how far the update sits from the alignment subspace."""
    projected_B_norm: float = 0.0
    """||C B||_F: the Pdst distance of a module whose served update is 0 (pruned)."""


@dataclass(frozen=True)
class ModuleAnalysis:
    """One module's score and what it takes to project it: C B = U (w X) on demand."""

    score: ModuleScore
    sub: Subspace
    weighted: torch.Tensor
    """w X = diag(w) U^T B (k x r), float32 (float64 for a float64 U), on the bank's device."""

    @functools.cached_property
    def projected_B(self) -> torch.Tensor:
        """C B in float32 on the bank's device: one more pass over U, only when asked for."""
        if self.sub.rank == 0:
            return torch.zeros(self.sub.d_out, self.weighted.shape[1], dtype=torch.float32, device=self.sub.U.device)
        return expand(self.sub.U, self.weighted).to(torch.float32)


@dataclass(frozen=True)
class ModuleInput:
    """One adapter module as the scorer needs it."""

    name: str
    sub: Subspace
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float


def trace_with_gram(X: torch.Tensor, Y: torch.Tensor, G: torch.Tensor) -> float:
    """tr(X^T Y G) for a symmetric r x r G: with G = A A^T, the Frobenius inner product <X A, Y A>.

    The SaLoRA-style overlap uses it; Safe LoRA's scores use the same identity row by row (``_score_batch``).
    """
    # tr(X^T Y G) = sum((X^T Y) * G^T) and G is symmetric.
    return float(torch.sum((X.T @ Y) * G))


def _stacked_runs(items: list[ModuleInput]) -> Iterator[tuple[list[ModuleInput], torch.Tensor]]:
    """Cut ``items`` (same U shape, dtype, device) into runs whose U's are one strided view.

    A bank stores the U's of one shape side by side (:mod:`vllm_safelora.bank.load`), so
    e.g. every layer's q_proj is at a constant distance from the next: such a run is
    batched with no copy. A U with storage of its own (a hand-made Subspace) is a run of one.
    """
    by_storage: dict[tuple, list[ModuleInput]] = {}
    for item in items:
        U = item.sub.U
        by_storage.setdefault((U.untyped_storage().data_ptr(), U.stride()), []).append(item)
    for group in by_storage.values():
        group.sort(key=lambda it: it.sub.U.storage_offset())
        run: list[ModuleInput] = []
        step = 0
        for item in group:
            off = item.sub.U.storage_offset()
            if run:
                gap = off - run[-1].sub.U.storage_offset()
                if gap > 0 and (len(run) == 1 or gap == step):
                    step = gap
                    run.append(item)
                    continue
                yield run, _view(run, step)
            run, step = [item], 0
        if run:
            yield run, _view(run, step)


def _view(run: list[ModuleInput], step: int) -> torch.Tensor:
    U0 = run[0].sub.U
    if len(run) == 1:
        return U0.unsqueeze(0)
    return torch.as_strided(U0, (len(run), *U0.shape), (step, *U0.stride()), U0.storage_offset())


def analyze_modules(items: Iterable[ModuleInput], kind: ProjectionKind) -> dict[str, ModuleAnalysis]:
    """Score every module from X = U^T B: one pass over each U, batched per shape."""
    groups: dict[tuple, list[ModuleInput]] = {}
    for item in items:
        if item.lora_B.shape[0] != item.sub.d_out:
            raise ValueError(f"{item.name}: lora_B has {item.lora_B.shape[0]} rows, the subspace has {item.sub.d_out}")
        U = item.sub.U
        key = (tuple(U.shape), U.dtype, U.device, tuple(item.lora_A.shape))
        groups.setdefault(key, []).append(item)
    out: dict[str, ModuleAnalysis] = {}
    for (u_shape, _, _, a_shape), group in groups.items():
        per_module = 8 * u_shape[1] * a_shape[0] * 3 + 1
        limit = max(1, BATCH_BYTES // per_module)
        for run, U in _stacked_runs(group):
            for i in range(0, len(run), limit):
                out.update(_score_batch(run[i : i + limit], U[i : i + limit], kind))
    return out


def _score_batch(run: list[ModuleInput], U: torch.Tensor, kind: ProjectionKind) -> dict[str, ModuleAnalysis]:
    device, f64 = U.device, torch.float64
    B = torch.stack([it.lora_B for it in run]).to(device=device)
    X = coordinates(U, B)  # (n, k, r)
    A64 = torch.stack([it.lora_A for it in run]).to(device=device, dtype=f64)
    B64 = B.to(f64)
    X64 = X.to(f64)
    G = torch.bmm(A64, A64.transpose(1, 2))
    H = torch.bmm(B64.transpose(1, 2), B64)
    w = torch.stack([it.sub.weights(kind) for it in run]).to(device=device, dtype=f64)  # (n, k)
    # Every trace is tr(X^T diag(v) X G) = sum_l v_l q_l with q_l = x_l^T G x_l (x_l: row l of X),
    # so one (k x r) @ (r x r) product serves all of them.
    q = (torch.bmm(X64, G) * X64).sum(dim=2)  # (n, k)
    x_sq = X64.square().sum(dim=2)  # (n, k): ||x_l||^2, for the Frobenius norms of B's parts
    m = w - 1.0

    norm_dw_sq = (H * G).sum(dim=(1, 2)).clamp_min(0.0)
    inner = (q * w).sum(dim=1)
    norm_cdw_sq = (q * w.square()).sum(dim=1).clamp_min(0.0)
    dist_dw_sq = (q * m.square()).sum(dim=1)
    dist_B_sq = (x_sq * m.square()).sum(dim=1)
    d_out, k = U.shape[1], U.shape[2]
    if k < d_out:
        # The part of B outside span(U), Gram H - X^T X; zero by definition when U spans every output direction.
        dist_dw_sq = dist_dw_sq + (norm_dw_sq - q.sum(dim=1))
        dist_B_sq = dist_B_sq + (H.diagonal(dim1=1, dim2=2).sum(dim=1) - x_sq.sum(dim=1))
    dist_dw_sq, dist_B_sq = dist_dw_sq.clamp_min(0.0), dist_B_sq.clamp_min(0.0)
    projected_norm = (x_sq * w.square()).sum(dim=1).sqrt()
    weighted = (w.unsqueeze(2) * X64).to(X.dtype)

    out: dict[str, ModuleAnalysis] = {}
    values = torch.stack([norm_dw_sq, inner, norm_cdw_sq, dist_dw_sq, dist_B_sq, projected_norm]).cpu().tolist()
    for i, item in enumerate(run):
        ndw_sq, inn, ncdw_sq, ddw_sq, dB_sq, pnorm = (col[i] for col in values)
        denom = math.sqrt(ndw_sq) * math.sqrt(ncdw_sq)
        # torch.nn.functional.cosine_similarity (the reference) gives 0 for a zero vector.
        cosine = min(1.0, max(-1.0, inn / denom)) if denom > 0.0 else 0.0
        norm_dw = math.sqrt(ndw_sq)
        score = ModuleScore(
            name=item.name,
            cosine=cosine,
            cosine_rounded=round_cosine(cosine),
            update_norm=abs(item.scale) * norm_dw,
            distance_B=math.sqrt(dB_sq),
            relative_distance=math.sqrt(ddw_sq) / norm_dw if norm_dw > 0.0 else 0.0,
            projected_B_norm=pnorm,
        )
        out[item.name] = ModuleAnalysis(score=score, sub=item.sub, weighted=weighted[i])
    return out


def analyze_module(
    name: str,
    sub: Subspace,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    kind: ProjectionKind,
) -> ModuleAnalysis:
    """Score one module (C B on demand, :attr:`ModuleAnalysis.projected_B`)."""
    return analyze_modules([ModuleInput(name, sub, lora_A, lora_B, scale)], kind)[name]


def round_cosine(cosine: float) -> float:
    """numpy.round(cos, 5) exactly: scale, round half to even, unscale (Python's round(x, 5)
    rounds the binary value instead and differs on decimal half-way cases)."""
    scale = 10**COSINE_DECIMALS
    return round(float(cosine) * scale) / scale


def select_modules(
    rounded_cosines: Mapping[str, float],
    mode: SelectMode,
    *,
    threshold: float | None = None,
    topk: int | None = None,
) -> set[str]:
    """Which modules to project, exactly as the reference decides.

    threshold: cos <= tau.  topk: tau := the k-th lowest cosine, then cos <= tau
    (ties at tau add modules, as in the reference).  all: every module.
    """
    mode = SelectMode(mode)
    if mode is SelectMode.ALL:
        return set(rounded_cosines)
    if mode is SelectMode.THRESHOLD:
        if threshold is None:
            raise ValueError("threshold selection needs a threshold")
        tau = threshold
    else:
        if topk is None or topk < 0:
            raise ValueError("topk selection needs topk >= 0")
        if topk == 0 or not rounded_cosines:
            return set()
        tau = sorted(rounded_cosines.values())[:topk][-1]
    return {name for name, cos in rounded_cosines.items() if cos <= tau}


def pdst_term(score: ModuleScore, projected: bool) -> float:
    """The reference's per-module Pdst term: 1 / (1 + ||lora_B_final - C lora_B||_F).

    A projected module's final lora_B *is* C lora_B, so its term is exactly 1.
    """
    return 1.0 if projected else 1.0 / (1.0 + score.distance_B)


def mean_pdst(terms: list[float]) -> float:
    return float(sum(terms) / len(terms)) if terms else 1.0
