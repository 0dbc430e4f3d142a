"""Safe LoRA math (arXiv 2405.16833), in the fast r x r form.

Per target module the alignment matrix is V = W_aligned - W_base, kept as its
thin SVD V = U S Q^T. The two projections of the paper are then

    approx:  C     = V V^T / ||V||_F  = U diag(S^2 / ||S||_2) U^T   (paper default, not idempotent)
    exact:   C_hat = V (V^T V)^+ V^T  = U U^T                        (over non-zero singular values)

so C B = U (w * (U^T B)) costs O(d_out * k * r) and never materialises a
d_out x d_out or d_out x d_in matrix.

With dW = s B A and G = A A^T (r x r), every Frobenius quantity the paper uses
is a trace of an r x r product (s cancels in every ratio):

    <C dW, dW>      = s^2 tr(B^T C B G)
    ||dW||^2        = s^2 tr(B^T B G)
    ||C dW||^2      = s^2 tr((CB)^T (CB) G)
    ||(C - I)dW||^2 = s^2 tr(((C - I)B)^T ((C - I)B) G)

C B is computed in float32 (on the bank's device); the traces in float64,
which costs nothing at r x r and makes the cosine exact to the data.

This module imports no vLLM and knows nothing about files.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Mapping

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
                keep = S > tol
            return keep.to(torch.float32)
        if self.frobenius_norm <= 0.0:
            return torch.zeros_like(S)
        return S * S / self.frobenius_norm


def apply_operator(sub: Subspace, B: torch.Tensor, kind: ProjectionKind) -> torch.Tensor:
    """C @ B in float32 on the subspace's device (B is d_out x r)."""
    if B.shape[0] != sub.d_out:
        raise ValueError(f"lora_B has {B.shape[0]} rows, the subspace has {sub.d_out}")
    U = sub.U.to(torch.float32)
    B32 = B.to(device=U.device, dtype=torch.float32)
    if sub.rank == 0:
        return torch.zeros_like(B32)
    # (B^T U)^T rather than U^T B: the same product, several times faster on
    # CPU for small r (a transposed-operand GEMM path).
    X = (B32.T @ U).T
    return U @ (sub.weights(kind).unsqueeze(1) * X)


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


@dataclass(frozen=True)
class ModuleAnalysis:
    score: ModuleScore
    projected_B: torch.Tensor
    """C B in float32 (device of the bank); written only if the module is selected."""


def trace_with_gram(X: torch.Tensor, Y: torch.Tensor, G: torch.Tensor) -> float:
    """tr(X^T Y G) for a symmetric r x r G: with G = A A^T, the Frobenius inner product <X A, Y A>.

    The one r x r trace every policy uses (Safe LoRA's scores here, the SaLoRA-style overlap).
    """
    # tr(X^T Y G) = sum((X^T Y) * G^T) and G is symmetric.
    return float(torch.sum((X.T @ Y) * G))


def analyze_module(
    name: str,
    sub: Subspace,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    kind: ProjectionKind,
) -> ModuleAnalysis:
    """Score one module and compute its projected lora_B (fast path)."""
    CB = apply_operator(sub, lora_B, kind)
    device = CB.device
    A64 = lora_A.to(device=device, dtype=torch.float64)
    B64 = lora_B.to(device=device, dtype=torch.float64)
    CB64 = CB.to(torch.float64)
    G = A64 @ A64.T
    D = CB64 - B64

    inner = trace_with_gram(B64, CB64, G)
    norm_dw_sq = max(trace_with_gram(B64, B64, G), 0.0)
    norm_cdw_sq = max(trace_with_gram(CB64, CB64, G), 0.0)
    dist_dw_sq = max(trace_with_gram(D, D, G), 0.0)

    denom = math.sqrt(norm_dw_sq) * math.sqrt(norm_cdw_sq)
    # torch.nn.functional.cosine_similarity (the reference) gives 0 for a zero vector.
    cosine = inner / denom if denom > 0.0 else 0.0
    cosine = min(1.0, max(-1.0, cosine))
    norm_dw = math.sqrt(norm_dw_sq)
    score = ModuleScore(
        name=name,
        cosine=cosine,
        cosine_rounded=round_cosine(cosine),
        update_norm=abs(scale) * norm_dw,
        distance_B=float(torch.linalg.vector_norm(D)),
        relative_distance=math.sqrt(dist_dw_sq) / norm_dw if norm_dw > 0.0 else 0.0,
    )
    return ModuleAnalysis(score=score, projected_B=CB)


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
