"""Whether vLLM can run a module's update s B A finitely in the dtype it serves it in.

This module imports no vLLM.
"""

from __future__ import annotations

import torch

from .limits import ReadLimits

# Accumulation headroom of the update bound (see update_problems): one output of
# x @ (s B A)^T sums d_in products; with |x| <= ACTIVATION_HEADROOM the sum stays
# finite in the served dtype when max|s B A| <= finfo.max / (ACTIVATION_HEADROOM * d_in).
ACTIVATION_HEADROOM = 16.0
# Rows of B per block when the exact max|s B A| is needed: blocks of <= 2^20 float64 elements.
_EXACT_BLOCK_ELEMENTS = 1 << 20
# Relative margin under the limit within which the float32 bound is not trusted (its
# rounding over d_in <= 1e5 terms is far below this) and the exact max is computed.
_BOUND_SLACK = 1e-3


def update_limit(dtype: torch.dtype, d_in: int, limits: ReadLimits) -> float:
    """The largest |entry| of s B A (and of lora_A) a module with ``d_in`` inputs may have in ``dtype``.

    One output of x @ (s B A)^T sums d_in products; with activations up to
    ACTIVATION_HEADROOM (16: inputs of LoRA'd projections are normalised hidden states,
    O(1) with outliers) the sum stays finite in ``dtype``. fp16 is the binding case
    (65504 / (16 d_in): 1.0 at d_in = 4096, 32 on the 128-wide test model); for bf16 and
    fp32 the dtype allows ~1e33, so ``max_update_abs`` (65536) caps it instead: an
    update of that size is already far outside any fine-tune (weights are O(0.01-1)),
    and larger finite ones overflow the next layer's norm (it squares them).
    """
    return min(limits.max_update_abs, torch.finfo(dtype).max / (ACTIVATION_HEADROOM * d_in))


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a 0-d tensor of t's dtype (NaN if t holds a NaN, inf if it holds an inf; 0 if empty)."""
    return t.abs().amax() if t.numel() else torch.zeros((), dtype=t.dtype)


def _norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norms along ``dim``, in float32 at least. Sum of squares rather than
    linalg.vector_norm, whose reduction across rows (dim 0) is ~15x slower on CPU; an
    overflow gives inf, which sends the caller to the exact check."""
    wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return wide.square().sum(dim).sqrt()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one reduction (max |t|), faster on CPU than isfinite().all()."""
    return bool(torch.isfinite(max_abs(t)))


def update_problems(name: str, A: torch.Tensor, B: torch.Tensor, scale: float, limits: ReadLimits) -> list[str]:
    """Whether vLLM can run this module's update finitely, as it will run it.

    vLLM casts lora_A to its LoRA dtype and folds s into lora_B there
    (``LoRALayerWeights.optimize``: ``lora_b *= scaling``), so both must stay finite
    after that cast; x @ lora_A^T must not overflow (bounded by max|lora_A|); and
    the update s B A itself must stay within :func:`update_limit`. The cheap
    Cauchy-Schwarz bound |s (B A)_ij| <= |s| max_i ||B_i,:|| max_j ||A_:,j|| decides
    almost every adapter; the exact blockwise max runs only when the bound is over.
    """
    dtype = limits.serve_dtype or A.dtype
    served = f"{str(dtype).removeprefix('torch.')} (the dtype vLLM runs it in)"
    # max|A| and max|B| are exact in any float dtype and propagate NaN; rounding to ``dtype``
    # and scaling are monotone in |x|, so the largest entry is finite after the cast (and
    # after s*) exactly when every entry is: one reduction per tensor, no full-size copies.
    a_abs, b_abs = max_abs(A), max_abs(B)
    if not (bool(torch.isfinite(a_abs.to(dtype))) and bool(torch.isfinite(b_abs.to(dtype) * scale))):
        return [
            f"module {name}: lora_A or s*lora_B (s = {scale:g}) is not finite in {served}; "
            "lower lora_alpha or the weights"
        ]
    limit = update_limit(dtype, int(A.shape[1]), limits)
    problems = []
    a_max = float(a_abs)
    if a_max > limit:
        problems.append(f"module {name}: |lora_A| reaches {a_max:.4g}; at most {limit:.4g} is safe in {served}")
    # The Cauchy-Schwarz bound with float32 accumulation (no float64 copies); within
    # _BOUND_SLACK of the limit (float32 rounding), or overflowed, the exact float64 max decides.
    bound = abs(scale) * float(_norms(B, 1).max()) * float(_norms(A, 0).max())
    if not bound <= limit * (1 - _BOUND_SLACK):
        exact = max_abs_update(A.double(), B.double(), scale)
        if exact > limit:
            problems.append(
                f"module {name}: the update s*B*A reaches {exact:.4g} (s = {scale:g}); at most {limit:.4g} is safe "
                f"in {served}. Lower lora_alpha or the weights"
            )
    return problems


def max_abs_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """Exact max |s B A| in float64, in row blocks of B so memory stays at ~8 MiB."""
    A64 = A.double()
    rows = max(1, _EXACT_BLOCK_ELEMENTS // max(1, int(A.shape[1])))
    best = 0.0
    for start in range(0, int(B.shape[0]), rows):
        best = max(best, float((B[start : start + rows].double() @ A64).abs().max()))
    return abs(scale) * best
