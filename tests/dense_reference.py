"""A deliberately plain, dense re-implementation of the Safe LoRA reference.

This mirrors IBM's SafeLoRA ``projected_weighted`` (arXiv 2405.16833) step by
step, so that the fast r x r path in ``vllm_safelora.projection`` can be
checked against it. Nothing here is clever: C is materialised as a dense
d_out x d_out matrix, the cosine is taken over the flattened d_out x d_in
products with ``torch.nn.functional.cosine_similarity``, and the rounding is
``numpy.round(cos, 5)``, exactly as the paper's code does.

The reference, per module (their "B" is PEFT's lora_A, their ``param_ori``
is lora_B):

    C    = V V^T / torch.norm(V)            (approx; V = W_aligned - W_base)
    W    = C @ lora_B
    fW   = W @ lora_A
    ori  = lora_B @ lora_A
    cos  = numpy.round(cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
    lora_B_new = W if cos <= thrs else lora_B
    dist = 1 / (1 + torch.norm(lora_B_new - W))
    Pdst = numpy.mean(dist over modules)

"number" mode: a first pass collects the cosines, thrs = numpy.sort(cos)[:k][-1],
then the threshold pass runs with that thrs.

Faithful quirks kept on purpose (tests document how the fast path differs):
  * ``torch.norm(V) == 0`` makes C = 0/0 = NaN (the cosine is then NaN, the
    module is never projected and Pdst is NaN);
  * number mode with k = 0 raises IndexError (``[][-1]``);
  * cosine_similarity clamps each norm at eps = 1e-8.

``dtype`` selects the arithmetic: float32 is what the paper runs, float64 is
the ground truth used by the parity tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy
import torch


# --------------------------------------------------------------------------
# The alignment operators, dense.
# --------------------------------------------------------------------------


def approx_operator(V: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's default C = V V^T / ||V||_F (d_out x d_out, NOT idempotent)."""
    V = V.to(dtype)
    return torch.mm(V, V.t()) / torch.norm(V)


def exact_operator(V: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The exact projection C_hat = V (V^T V)^+ V^T, with a dense pseudo-inverse."""
    V = V.to(dtype)
    return torch.mm(V, torch.mm(torch.linalg.pinv(torch.mm(V.t(), V)), V.t()))


def operator(V: torch.Tensor, kind: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    kind = str(getattr(kind, "value", kind))
    if kind == "approx":
        return approx_operator(V, dtype)
    if kind == "exact":
        return exact_operator(V, dtype)
    raise ValueError(f"unknown projection kind {kind!r}")


def operator_from_svd(
    U: torch.Tensor,
    S: torch.Tensor,
    frobenius_norm: float,
    kind: str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense C built from a (possibly truncated) SVD: U diag(w) U^T.

    approx: w = S^2 / frobenius_norm (the untruncated ||V||_F); exact: w = 1.
    """
    kind = str(getattr(kind, "value", kind))
    U = U.to(dtype)
    S = S.to(dtype)
    if kind == "approx":
        w = S * S / frobenius_norm
    elif kind == "exact":
        w = torch.ones_like(S)
    else:
        raise ValueError(f"unknown projection kind {kind!r}")
    return U @ torch.diag(w) @ U.t()


# --------------------------------------------------------------------------
# One module, and the whole adapter, as the reference does it.
# --------------------------------------------------------------------------


@dataclass
class ModuleResult:
    cosine_raw: float
    """cosine_similarity(...).item(), not rounded."""
    cosine: float
    """numpy.round(cosine_raw, 5): what the reference compares and reports."""
    W: torch.Tensor
    """C @ lora_B (the projected lora_B)."""


def score_module(
    C: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> ModuleResult:
    C = C.to(dtype)
    A = lora_A.to(dtype)
    B = lora_B.to(dtype)
    W = torch.mm(C, B)
    fW = torch.mm(W, A)
    ori = torch.mm(B, A)
    raw = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1)).item()
    return ModuleResult(cosine_raw=raw, cosine=float(numpy.round(raw, 5)), W=W)


@dataclass
class AdapterResult:
    cosines: list[float]
    """Rounded cosines, in module order (the reference's ``cos_total``)."""
    cosines_raw: list[float]
    selected: list[bool]
    new_B: list[torch.Tensor]
    pdst: float
    threshold: float = field(default=float("nan"))


def projected_weighted(
    Cs: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    thrs: float,
    dtype: torch.dtype = torch.float64,
) -> AdapterResult:
    """One threshold pass over every module, as ``projected_weighted``."""
    cos_total, raw_total, selected, new_B, dis = [], [], [], [], []
    for C, A, B in zip(Cs, As, Bs):
        res = score_module(C, A, B, dtype)
        B = B.to(dtype)
        if res.cosine <= thrs:
            B_new = res.W
            selected.append(True)
        else:
            B_new = B
            selected.append(False)
        dist = 1 / (1 + torch.norm(B_new.reshape(1, -1) - res.W.reshape(1, -1)))
        dis.append(dist.item())
        cos_total.append(res.cosine)
        raw_total.append(res.cosine_raw)
        new_B.append(B_new)
    pdst = float(numpy.mean(dis))
    return AdapterResult(cos_total, raw_total, selected, new_B, pdst, float(thrs))


def project_adapter(
    Cs: list[torch.Tensor],
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    mode: str,
    *,
    threshold: float | None = None,
    topk: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> AdapterResult:
    """threshold / number (topk) / all, as the reference selects.

    ``all`` is not in the paper's code; it is the threshold pass with +inf.
    """
    mode = str(getattr(mode, "value", mode))
    if mode == "threshold":
        return projected_weighted(Cs, As, Bs, threshold, dtype)
    if mode in ("topk", "number"):
        first = projected_weighted(Cs, As, Bs, 0, dtype)
        thrs = numpy.sort(first.cosines)[:topk][-1]  # IndexError for topk == 0, as the reference
        return projected_weighted(Cs, As, Bs, float(thrs), dtype)
    if mode == "all":
        return projected_weighted(Cs, As, Bs, float("inf"), dtype)
    raise ValueError(f"unknown mode {mode!r}")


def dense_update_metrics(
    C: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0
) -> dict[str, float]:
    """Frobenius quantities on the dense update dW = s B A, in float64."""
    C = C.to(torch.float64)
    dW = scale * lora_B.to(torch.float64) @ lora_A.to(torch.float64)
    CdW = C @ dW
    return {
        "inner": float(torch.sum(CdW * dW)),
        "norm_dw_sq": float(torch.sum(dW * dW)),
        "norm_cdw_sq": float(torch.sum(CdW * CdW)),
        "dist_dw_sq": float(torch.sum((CdW - dW) ** 2)),
    }
