"""Property tests (hypothesis) for the identities the fast Safe LoRA path relies on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_safelora.projection import (
    ProjectionKind,
    SelectMode,
    Subspace,
    trace_with_gram,
    analyze_module,
    apply_operator,
    round_cosine,
    select_modules,
)

F64 = torch.float64
F32 = torch.float32
FAST = settings(max_examples=50, deadline=None)

dims = st.integers(min_value=1, max_value=24)
ranks = st.integers(min_value=1, max_value=8)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
kinds = st.sampled_from(list(ProjectionKind))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(seed, d_out, d_in, r, dtype=F32):
    """V (d_out x d_in), lora_A (r x d_in), lora_B (d_out x r), at random scales."""
    g = _gen(seed)
    scale_v, scale_a, scale_b = (10 ** float(torch.empty(1).uniform_(-3, 1, generator=g)) for _ in range(3))
    V = torch.randn(d_out, d_in, generator=g, dtype=F64) * scale_v
    A = torch.randn(r, d_in, generator=g, dtype=F64) * scale_a
    B = torch.randn(d_out, r, generator=g, dtype=F64) * scale_b
    return V.to(dtype), A.to(dtype), B.to(dtype)


def _subspace(V: torch.Tensor) -> Subspace:
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    return Subspace(U=U, S=S, frobenius_norm=float(torch.linalg.norm(V)))


def _dense_C(V: torch.Tensor, kind) -> torch.Tensor:
    V = V.to(F64)
    if ProjectionKind(kind) is ProjectionKind.APPROX:
        return V @ V.T / torch.linalg.norm(V)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    return U @ U.T


# --------------------------------------------------------------------------
# Trace identities vs dense Frobenius products (float64)
# --------------------------------------------------------------------------


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks)
def testtrace_with_gram_is_frobenius_inner_product(seed, d_out, d_in, r):
    """tr(X^T Y A A^T) = <X A, Y A>_F for any X, Y (d_out x r)."""
    g = _gen(seed)
    X = torch.randn(d_out, r, generator=g, dtype=F64)
    Y = torch.randn(d_out, r, generator=g, dtype=F64)
    A = torch.randn(r, d_in, generator=g, dtype=F64)
    dense = float(torch.sum((X @ A) * (Y @ A)))
    assert trace_with_gram(X, Y, A @ A.T) == pytest.approx(dense, rel=1e-10, abs=1e-10)


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks, kind=kinds)
def test_paper_traces_match_dense(seed, d_out, d_in, r, kind):
    """<C dW, dW>, ||dW||^2, ||C dW||^2 and ||(C - I) dW||^2 as r x r traces, in float64."""
    V, A, B = _problem(seed, d_out, d_in, r, F64)
    C = _dense_C(V, kind)
    G = A @ A.T
    CB = C @ B
    dW = B @ A
    CdW = C @ dW
    pairs = [
        (trace_with_gram(B, CB, G), torch.sum(CdW * dW)),
        (trace_with_gram(B, B, G), torch.sum(dW * dW)),
        (trace_with_gram(CB, CB, G), torch.sum(CdW * CdW)),
        (trace_with_gram(CB - B, CB - B, G), torch.sum((CdW - dW) ** 2)),
    ]
    for fast, dense in pairs:
        dense = float(dense)
        assert fast == pytest.approx(dense, rel=1e-9, abs=1e-12 * (1 + float(torch.sum(dW * dW))))


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks, kind=kinds, s=st.floats(0.01, 100.0))
def test_scores_match_dense_update(seed, d_out, d_in, r, kind, s):
    V, A, B = _problem(seed, d_out, d_in, r, F32)
    a = analyze_module("m", _subspace(V), A, B, s, kind)
    C = _dense_C(V, kind)
    dW = B.to(F64) @ A.to(F64)
    CdW = C @ dW
    n_dw, n_cdw = float(torch.linalg.norm(dW)), float(torch.linalg.norm(CdW))
    cos = float(torch.sum(CdW * dW)) / (n_dw * n_cdw) if n_dw * n_cdw > 0 else 0.0
    assert a.score.cosine == pytest.approx(cos, abs=1e-5)
    assert a.score.update_norm == pytest.approx(s * n_dw, rel=1e-5)
    if n_dw > 0:
        rel = float(torch.linalg.norm(CdW - dW)) / n_dw
        assert a.score.relative_distance == pytest.approx(rel, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------
# Cosine: range and invariances
# --------------------------------------------------------------------------


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks, kind=kinds, s=st.floats(-100.0, 100.0))
def test_cosine_in_range(seed, d_out, d_in, r, kind, s):
    V, A, B = _problem(seed, d_out, d_in, r)
    a = analyze_module("m", _subspace(V), A, B, s, kind)
    assert -1.0 <= a.score.cosine <= 1.0
    # C is positive semi-definite in both kinds, so <C dW, dW> >= 0
    assert a.score.cosine >= -1e-6
    assert a.score.cosine_rounded == round_cosine(a.score.cosine)
    assert math.isfinite(a.score.distance_B) and a.score.distance_B >= 0


@FAST
@given(
    seed=seeds,
    d_out=dims,
    d_in=dims,
    r=ranks,
    kind=kinds,
    s=st.floats(1e-3, 1e3),
    t=st.floats(1e-3, 1e3),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_cosine_scale_invariance(seed, d_out, d_in, r, kind, s, t, sign):
    """The cosine ignores the LoRA scale s, a rescaling B A -> (tB)(A/t), scaling B or A alone,
    and scaling V (C is linear in ||V||)."""
    V, A, B = _problem(seed, d_out, d_in, r)
    sub = _subspace(V)
    base = analyze_module("m", sub, A, B, 1.0, kind).score
    variants = [
        analyze_module("m", sub, A, B, sign * s, kind).score,
        analyze_module("m", sub, A / t, B * t, 1.0, kind).score,
        analyze_module("m", sub, A, B * (sign * t), 1.0, kind).score,
        analyze_module("m", sub, A * t, B, 1.0, kind).score,
        analyze_module("m", _subspace(V * t), A, B, 1.0, kind).score,
    ]
    for v in variants:
        assert v.cosine == pytest.approx(base.cosine, abs=1e-5)
    assert variants[0].update_norm == pytest.approx(s * base.update_norm, rel=1e-6)


# --------------------------------------------------------------------------
# The operators
# --------------------------------------------------------------------------


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks)
def test_exact_projection_is_idempotent(seed, d_out, d_in, r):
    V, _, B = _problem(seed, d_out, d_in, r)
    sub = _subspace(V)
    once = apply_operator(sub, B, ProjectionKind.EXACT)
    twice = apply_operator(sub, once, ProjectionKind.EXACT)
    assert torch.allclose(twice, once, rtol=1e-4, atol=1e-5 * float(B.abs().max()))


@FAST
@given(seed=seeds, d_out=dims, d_in=dims, r=ranks)
def test_approx_operator_squares_weights(seed, d_out, d_in, r):
    """C (C B) = U diag(w^2) U^T B: approx C is idempotent only if every weight is 0 or 1."""
    V, _, B = _problem(seed, d_out, d_in, r, F64)
    sub = _subspace(V)
    twice = apply_operator(sub, apply_operator(sub, B, ProjectionKind.APPROX), ProjectionKind.APPROX)
    U = sub.U.to(F64)
    w = sub.S.to(F64) ** 2 / sub.frobenius_norm
    expected = U @ torch.diag(w * w) @ U.T @ B
    assert torch.allclose(twice.to(F64), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-30)


def test_approx_operator_not_idempotent_in_general():
    g = _gen(0)
    V = torch.randn(16, 24, generator=g)
    B = torch.randn(16, 4, generator=g)
    sub = _subspace(V)
    once = apply_operator(sub, B, ProjectionKind.APPROX)
    twice = apply_operator(sub, once, ProjectionKind.APPROX)
    assert not torch.allclose(once, twice, rtol=1e-2)
    # and the rank-one V with ||V||_F = 1 is the one case where it is (w = [1])
    v = torch.randn(16, 1, generator=g)
    q = torch.randn(1, 24, generator=g)
    V1 = v @ q
    V1 = V1 / torch.linalg.norm(V1)
    U, S, _ = torch.linalg.svd(V1, full_matrices=False)
    sub1 = Subspace(U=U[:, :1], S=S[:1], frobenius_norm=1.0)
    o1 = apply_operator(sub1, B, ProjectionKind.APPROX)
    assert torch.allclose(apply_operator(sub1, o1, ProjectionKind.APPROX), o1, atol=1e-5)


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------

cos_maps = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=4),
    st.floats(-1.0, 1.0).map(round_cosine) | st.sampled_from([0.0, 0.35, 0.5]),
    max_size=20,
)


@FAST
@given(cos=cos_maps, t1=st.floats(-1.5, 1.5), t2=st.floats(-1.5, 1.5))
def test_threshold_selection_is_monotone(cos, t1, t2):
    lo, hi = min(t1, t2), max(t1, t2)
    sel_lo = select_modules(cos, SelectMode.THRESHOLD, threshold=lo)
    sel_hi = select_modules(cos, SelectMode.THRESHOLD, threshold=hi)
    assert sel_lo <= sel_hi
    assert sel_hi == {n for n, c in cos.items() if c <= hi}


@FAST
@given(cos=cos_maps, k=st.integers(0, 30))
def test_topk_selection(cos, k):
    sel = select_modules(cos, SelectMode.TOPK, topk=k)
    n = len(cos)
    if k == 0 or n == 0:
        assert sel == set()
        return
    assert len(sel) >= min(k, n)
    if k >= n:
        assert sel == set(cos)
    # it is the threshold rule at tau = k-th lowest value
    tau = sorted(cos.values())[min(k, n) - 1]
    assert sel == select_modules(cos, SelectMode.THRESHOLD, threshold=tau)
    # without ties at tau exactly k modules
    if sum(1 for c in cos.values() if c == tau) == 1 and k <= n:
        assert len(sel) == k
    # every selected module scores no higher than every unselected one
    if sel and sel != set(cos):
        assert max(cos[x] for x in sel) < min(cos[x] for x in set(cos) - sel)


@FAST
@given(cos=cos_maps)
def test_all_selection(cos):
    assert select_modules(cos, SelectMode.ALL) == set(cos)


def test_selection_rejects_missing_parameters():
    with pytest.raises(ValueError):
        select_modules({"a": 0.1}, SelectMode.THRESHOLD)
    with pytest.raises(ValueError):
        select_modules({"a": 0.1}, SelectMode.TOPK)
    with pytest.raises(ValueError):
        select_modules({"a": 0.1}, SelectMode.TOPK, topk=-1)
