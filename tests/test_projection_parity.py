"""Parity of the fast Safe LoRA path (vllm_safelora.projection) with the dense reference.

The reference (tests/dense_reference.py) is the paper's ``projected_weighted``
written out densely; float64 is the ground truth, float32 is what the paper runs.
Subspaces are built the way a bank would: ``torch.linalg.svd(V, full_matrices=False)``
of the float32 V, frobenius_norm = ||V||_F.

Documented divergences from the reference (each pinned by a test below):
  * V == 0: the reference divides 0 by 0 (C = NaN, cosine NaN, never projected,
    Pdst NaN); the fast path uses C = 0, cosine 0, and the Safe LoRA policy never
    selects such a module (like the reference; see tests/test_engine.py).
  * number mode with k = 0: the reference raises IndexError; the fast path selects nothing.
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dense_reference as ref  # noqa: E402

from vllm_safelora.projection import (  # noqa: E402
    ProjectionKind,
    SelectMode,
    Subspace,
    analyze_module,
    mean_pdst,
    pdst_term,
    round_cosine,
    select_modules,
)

F64 = torch.float64
F32 = torch.float32

SHAPES = [(64, 128), (128, 128), (256, 128), (48, 32)]  # GQA v_proj, square, d_out > d_in, odd
RANKS = [1, 2, 4, 8, 16]
KINDS = [ProjectionKind.APPROX, ProjectionKind.EXACT]


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))
    return Q


def make_V(d_out: int, d_in: int, gen: torch.Generator, *, floor: float = 0.05) -> torch.Tensor:
    """A float32 V with a decaying but well-conditioned spectrum (cond <= 1/floor + 1).

    The decay rate is random, so modules' cosines spread out.
    """
    k = min(d_out, d_in)
    tau = float(torch.empty(1).uniform_(2.0, 0.6 * k, generator=gen))
    S = floor + torch.exp(-torch.arange(k, dtype=F64) / tau)
    S = S * float(torch.empty(1).uniform_(0.01, 0.2, generator=gen))
    V = _orthonormal(d_out, k, gen) @ torch.diag(S) @ _orthonormal(d_in, k, gen).T
    return V.to(F32)


def make_lora(d_out: int, d_in: int, r: int, gen: torch.Generator, V: torch.Tensor | None = None):
    """lora_A (r x d_in) and lora_B (d_out x r); B partly leans on V's top directions."""
    A = (torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)).to(F32)
    B = torch.randn(d_out, r, generator=gen, dtype=F64)
    if V is not None:
        U, _, _ = torch.linalg.svd(V.to(F64), full_matrices=False)
        lean = float(torch.rand(1, generator=gen)) * 3.0
        top = U[:, : max(1, U.shape[1] // 8)]
        B = B + lean * top @ torch.randn(top.shape[1], r, generator=gen, dtype=F64)
    return A, (B * 0.01).to(F32)


def make_subspace(V: torch.Tensor, keep: int | None = None) -> Subspace:
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    fro = float(torch.linalg.norm(V))
    if keep is not None:
        U, S = U[:, :keep], S[:keep]
    return Subspace(U=U, S=S, frobenius_norm=fro)


class Module:
    def __init__(self, name, V, A, B, sub):
        self.name, self.V, self.A, self.B, self.sub = name, V, A, B, sub
        self._C = {}

    def C(self, kind, dtype):
        """The dense reference operator, computed once per (kind, dtype)."""
        key = (str(getattr(kind, "value", kind)), dtype)
        if key not in self._C:
            self._C[key] = ref.operator(self.V, kind, dtype)
        return self._C[key]


def make_adapter(seed: int, n: int = 12, duplicate: int = 0) -> list[Module]:
    """n modules of mixed shapes/ranks; the last ``duplicate`` modules copy earlier ones (ties)."""
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(n):
        if i >= n - duplicate:
            src = mods[i - (n - duplicate)]
            dup = Module(f"m{i}", src.V, src.A.clone(), src.B.clone(), src.sub)
            dup._C = src._C
            mods.append(dup)
            continue
        d_out, d_in = SHAPES[i % len(SHAPES)]
        r = RANKS[i % len(RANKS)]
        V = make_V(d_out, d_in, gen)
        A, B = make_lora(d_out, d_in, r, gen, V)
        mods.append(Module(f"m{i}", V, A, B, make_subspace(V)))
    return mods


def fast_adapter(mods, kind, mode, threshold=None, topk=None, scale=2.0):
    analyses = {m.name: analyze_module(m.name, m.sub, m.A, m.B, scale, kind) for m in mods}
    rounded = {k: a.score.cosine_rounded for k, a in analyses.items()}
    selected = select_modules(rounded, mode, threshold=threshold, topk=topk)
    pdst = mean_pdst([pdst_term(analyses[m.name].score, m.name in selected) for m in mods])
    return analyses, selected, pdst


def ref_adapter(mods, kind, mode, dtype, threshold=None, topk=None):
    Cs = [m.C(kind, dtype) for m in mods]
    res = ref.project_adapter(
        Cs, [m.A for m in mods], [m.B for m in mods], mode, threshold=threshold, topk=topk, dtype=dtype
    )
    selected = {m.name for m, s in zip(mods, res.selected) if s}
    return res, selected


def near_rounding_boundary(cos: float, tol: float = 1e-6) -> bool:
    """True when cos is within tol of a point where round(., 5) changes value."""
    frac = abs(cos) * 1e5 - math.floor(abs(cos) * 1e5)
    return abs(frac - 0.5) * 1e-5 < tol


def assert_same_selection(fast_sel, ref_sel, ref_res, mods):
    diff = fast_sel ^ ref_sel
    raw = {m.name: c for m, c in zip(mods, ref_res.cosines_raw)}
    assert all(near_rounding_boundary(raw[n]) for n in diff), (
        f"selection differs on {sorted(diff)} away from any rounding boundary"
    )


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.to(F64)
    den = float(torch.linalg.norm(truth))
    return float(torch.linalg.norm(x.to(F64) - truth)) / (den if den > 0 else 1.0)


# --------------------------------------------------------------------------
# One module
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_module_parity(shape, r, kind):
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(1000 * d_out + 10 * d_in + r)
    V = make_V(d_out, d_in, gen)
    A, B = make_lora(d_out, d_in, r, gen, V)
    sub = make_subspace(V)
    scale = 16.0 / r

    got = analyze_module("m", sub, A, B, scale, kind)

    C64 = ref.operator(V, kind, F64)
    r64 = ref.score_module(C64, A, B, F64)
    r32 = ref.score_module(ref.operator(V, kind, F32), A, B, F32)

    # projected lora_B: float32 tolerance against the truth and against the paper's float32
    assert got.projected_B.dtype == F32 and got.projected_B.shape == B.shape
    assert rel_err(got.projected_B, r64.W) < 5e-6
    # the float32 exact reference inverts V^T V (condition number squared): it is the
    # less accurate of the two, by far
    tol32 = 2e-5 if kind is ProjectionKind.APPROX else 1e-3
    assert rel_err(got.projected_B, r32.W) < tol32

    # cosine: within 1e-6 of float64 (toy sizes), and ~float32 agreement with the paper's arithmetic
    assert abs(got.score.cosine - r64.cosine_raw) < 1e-6
    assert abs(got.score.cosine - r32.cosine_raw) < tol32 / 2
    if not near_rounding_boundary(r64.cosine_raw):
        assert got.score.cosine_rounded == r64.cosine

    # the other figures against dense float64 Frobenius quantities
    dense = ref.dense_update_metrics(C64, A, B, scale)
    assert got.score.update_norm == pytest.approx(math.sqrt(dense["norm_dw_sq"]), rel=1e-6)
    assert got.score.relative_distance == pytest.approx(
        math.sqrt(dense["dist_dw_sq"] / dense["norm_dw_sq"]), rel=1e-5, abs=2e-6
    )
    assert got.score.distance_B == pytest.approx(
        float(torch.linalg.norm(r64.W - B.to(F64))), rel=1e-5, abs=1e-5 * float(torch.linalg.norm(B))
    )
    # Pdst term: 1 if projected (final B is C B), else 1 / (1 + ||B - C B||)
    assert pdst_term(got.score, True) == 1.0
    ref_dist = 1 / (1 + float(torch.norm(B.to(F64) - r64.W)))
    assert pdst_term(got.score, False) == pytest.approx(ref_dist, rel=1e-6)


def test_exact_is_identity_for_full_row_rank_V():
    """Design note: for d_out <= d_in and full-rank V, C_hat = I (a no-op)."""
    gen = torch.Generator().manual_seed(7)
    V = make_V(64, 128, gen)
    A, B = make_lora(64, 128, 4, gen)
    got = analyze_module("m", make_subspace(V), A, B, 1.0, ProjectionKind.EXACT)
    assert rel_err(got.projected_B, B) < 1e-5
    assert got.score.cosine == pytest.approx(1.0, abs=1e-7)
    assert torch.allclose(ref.exact_operator(V, F64), torch.eye(64, dtype=F64), atol=1e-9)


def test_svd_form_equals_dense_operator():
    gen = torch.Generator().manual_seed(3)
    V = make_V(96, 64, gen)
    U, S, _ = torch.linalg.svd(V.to(F64), full_matrices=False)
    fro = float(torch.linalg.norm(V.to(F64)))
    for kind in ("approx", "exact"):
        dense = ref.operator(V, kind, F64)
        from_svd = ref.operator_from_svd(U, S, fro, kind, F64)
        assert torch.allclose(dense, from_svd, atol=1e-10 * float(dense.abs().max()))


# --------------------------------------------------------------------------
# A whole adapter: selection, projected weights, Pdst
# --------------------------------------------------------------------------


def _check_adapter(mods, kind, mode, threshold=None, topk=None):
    analyses, fast_sel, fast_pdst = fast_adapter(mods, kind, mode, threshold, topk)
    res64, sel64 = ref_adapter(mods, kind, mode, F64, threshold, topk)
    res32, sel32 = ref_adapter(mods, kind, mode, F32, threshold, topk)

    assert_same_selection(fast_sel, sel64, res64, mods)
    assert_same_selection(fast_sel, sel32, res32, mods)
    for m, cos_raw, new_B in zip(mods, res64.cosines_raw, res64.new_B):
        a = analyses[m.name]
        assert abs(a.score.cosine - cos_raw) < 1e-6
        final_B = a.projected_B if m.name in fast_sel else m.B
        if m.name in fast_sel ^ sel64:
            continue
        assert rel_err(final_B, new_B) < 5e-6
    if not (fast_sel ^ sel64):
        assert fast_pdst == pytest.approx(res64.pdst, abs=1e-6)
        assert fast_pdst == pytest.approx(res32.pdst, abs=1e-5)
    return fast_sel, res64


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adapter_threshold_parity(seed, kind):
    mods = make_adapter(seed, n=12)
    rounded = sorted({analyze_module(m.name, m.sub, m.A, m.B, 1.0, kind).score.cosine_rounded for m in mods})
    taus = [0.35, -1.0, 2.0, rounded[0], rounded[len(rounded) // 2], rounded[-1], rounded[len(rounded) // 2] - 1e-5]
    for tau in taus:
        fast_sel, res64 = _check_adapter(mods, kind, SelectMode.THRESHOLD, threshold=tau)
        # threshold is inclusive: a module whose rounded cosine equals tau is projected
        for m in mods:
            a = round_cosine(analyze_module(m.name, m.sub, m.A, m.B, 1.0, kind).score.cosine)
            assert (m.name in fast_sel) == (a <= tau)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("duplicate", [0, 4])
def test_adapter_topk_parity(kind, duplicate):
    mods = make_adapter(10 + duplicate, n=12, duplicate=duplicate)
    n = len(mods)
    for k in [1, 2, 3, 5, n - 1, n, n + 5]:
        fast_sel, res64 = _check_adapter(mods, kind, SelectMode.TOPK, topk=k)
        assert len(fast_sel) >= min(k, n)
        if k >= n:
            assert fast_sel == {m.name for m in mods}


def test_topk_ties_add_modules():
    """Duplicated modules tie exactly; tau = k-th lowest, then cos <= tau selects the whole tie."""
    mods = make_adapter(21, n=8, duplicate=4)  # m4..m7 copy m0..m3
    kind = ProjectionKind.APPROX
    analyses, _, _ = fast_adapter(mods, kind, SelectMode.ALL)
    lowest = min(mods[:4], key=lambda m: analyses[m.name].score.cosine)
    twin = mods[4 + mods.index(lowest)]
    fast_sel, res64 = _check_adapter(mods, kind, SelectMode.TOPK, topk=1)
    assert fast_sel == {lowest.name, twin.name}
    assert sum(res64.selected) == 2


def test_topk_zero_selects_nothing_reference_crashes():
    mods = make_adapter(5, n=6)
    _, fast_sel, fast_pdst = fast_adapter(mods, ProjectionKind.APPROX, SelectMode.TOPK, topk=0)
    assert fast_sel == set()
    # nothing projected: Pdst equals the reference's threshold pass that projects nothing
    res, _ = ref_adapter(mods, "approx", "threshold", F64, threshold=-2.0)
    assert fast_pdst == pytest.approx(res.pdst, abs=1e-6)
    with pytest.raises(IndexError):  # numpy.sort(cos)[:0][-1]
        ref_adapter(mods, "approx", "topk", F64, topk=0)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_adapter_all_parity(kind):
    mods = make_adapter(4, n=10)
    fast_sel, res64 = _check_adapter(mods, kind, SelectMode.ALL)
    assert fast_sel == {m.name for m in mods}
    assert all(res64.selected)


# --------------------------------------------------------------------------
# Degenerate modules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_zero_update_behaves_like_reference(kind):
    """lora_B == 0 (PEFT's init) or lora_A == 0: cos 0 in both, projected at any tau >= 0, Pdst 1."""
    gen = torch.Generator().manual_seed(11)
    V = make_V(64, 128, gen)
    A, B = make_lora(64, 128, 8, gen)
    mods = [
        Module("zeroB", V, A, torch.zeros_like(B), make_subspace(V)),
        Module("zeroA", V, torch.zeros_like(A), B, make_subspace(V)),
    ]
    for m in mods:
        a = analyze_module(m.name, m.sub, m.A, m.B, 2.0, kind)
        for dtype in (F32, F64):
            r = ref.score_module(ref.operator(V, kind, dtype), m.A, m.B, dtype)
            assert r.cosine == 0.0
        assert a.score.cosine == 0.0 and a.score.cosine_rounded == 0.0
        assert a.score.update_norm == 0.0 and a.score.relative_distance == 0.0
    fast_sel, res64 = _check_adapter(mods, kind, SelectMode.THRESHOLD, threshold=0.35)
    assert fast_sel == {"zeroA", "zeroB"} and all(res64.selected)
    _, _, pdst = fast_adapter(mods, kind, SelectMode.THRESHOLD, threshold=0.35)
    assert pdst == 1.0 and res64.pdst == 1.0


def test_zero_V_approx_fast_path_is_zero_reference_is_nan():
    """V == 0: the fast path uses C = 0 (cos 0, C B = 0); the reference computes 0/0 = NaN.

    Consequence in threshold mode (documented divergence): the fast path *projects* such a
    module (0 <= tau), i.e. zeroes its lora_B; the reference never projects it (NaN <= tau is
    False) and its Pdst becomes NaN.
    """
    gen = torch.Generator().manual_seed(12)
    V = torch.zeros(64, 128)
    A, B = make_lora(64, 128, 8, gen)
    sub = make_subspace(V)
    assert sub.frobenius_norm == 0.0
    a = analyze_module("m", sub, A, B, 1.0, ProjectionKind.APPROX)
    assert a.score.cosine == 0.0
    assert torch.count_nonzero(a.projected_B) == 0
    assert a.score.distance_B == pytest.approx(float(torch.linalg.norm(B.double())), rel=1e-6)

    r = ref.score_module(ref.approx_operator(V, F32), A, B, F32)
    assert math.isnan(r.cosine)
    res = ref.projected_weighted([ref.approx_operator(V, F32)], [A], [B], 0.35, F32)
    assert res.selected == [False] and math.isnan(res.pdst)
    assert select_modules({"m": a.score.cosine_rounded}, "threshold", threshold=0.35) == {"m"}


def test_zero_V_exact_projects_to_zero():
    gen = torch.Generator().manual_seed(13)
    V = torch.zeros(64, 128)
    A, B = make_lora(64, 128, 8, gen)
    a = analyze_module("m", make_subspace(V), A, B, 1.0, ProjectionKind.EXACT)
    assert torch.allclose(ref.exact_operator(V, F64), torch.zeros(64, 64, dtype=F64))
    assert torch.count_nonzero(a.projected_B) == 0


def test_rank_deficient_exact_full_thin_svd():
    gen = torch.Generator().manual_seed(14)
    V = (torch.randn(64, 4, generator=gen) @ torch.randn(4, 128, generator=gen)).to(F32)
    A, B = make_lora(64, 128, 8, gen)
    a = analyze_module("m", make_subspace(V), A, B, 1.0, ProjectionKind.EXACT)
    r64 = ref.score_module(ref.exact_operator(V, F64), A, B, F64)
    assert rel_err(a.projected_B, r64.W) < 1e-4
    assert abs(a.score.cosine - r64.cosine_raw) < 1e-5


def test_rank_deficient_exact_with_numerical_rank_kept():
    """The same V, with the Subspace cut to its numerical rank, matches the pinv reference."""
    gen = torch.Generator().manual_seed(14)
    V = (torch.randn(64, 4, generator=gen) @ torch.randn(4, 128, generator=gen)).to(F32)
    A, B = make_lora(64, 128, 8, gen)
    _, S, _ = torch.linalg.svd(V, full_matrices=False)
    keep = int((S > S[0] * max(V.shape) * torch.finfo(F32).eps).sum())
    assert keep == 4
    for kind in KINDS:
        a = analyze_module("m", make_subspace(V, keep), A, B, 1.0, kind)
        r64 = ref.score_module(ref.operator(V, kind, F64), A, B, F64)
        assert rel_err(a.projected_B, r64.W) < 1e-5
        assert abs(a.score.cosine - r64.cosine_raw) < 1e-6


# --------------------------------------------------------------------------
# Truncated subspaces
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 128), (64, 128), (256, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_truncated_subspace_matches_dense_truncated_operator(shape):
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(20 + d_out)
    V = make_V(d_out, d_in, gen, floor=0.0)
    A, B = make_lora(d_out, d_in, 8, gen, V)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    fro = float(torch.linalg.norm(V))
    C_full = ref.operator_from_svd(U, S, fro, "approx", F64)
    for k in [1, 4, 16, min(shape) // 2, min(shape)]:
        sub = make_subspace(V, keep=k)
        assert sub.frobenius_norm == fro  # truncation keeps ||V||_F of the untruncated V
        for kind in KINDS:
            Ck = ref.operator_from_svd(U[:, :k], S[:k], fro, kind, F64)
            a = analyze_module("m", sub, A, B, 1.0, kind)
            rk = ref.score_module(Ck, A, B, F64)
            assert rel_err(a.projected_B, rk.W) < 5e-6
            assert abs(a.score.cosine - rk.cosine_raw) < 1e-6
        # the projected B moves by at most the operator-norm error bound
        bound = float(S[k]) ** 2 / float(torch.linalg.norm(S)) if k < len(S) else 0.0
        a = analyze_module("m", sub, A, B, 1.0, ProjectionKind.APPROX)
        full = C_full @ B.to(F64)
        assert float(torch.linalg.matrix_norm(a.projected_B.to(F64) - full, ord=2)) <= (
            bound * float(torch.linalg.matrix_norm(B.to(F64), ord=2)) * (1 + 1e-4) + 1e-6 * float(full.norm())
        )


@pytest.mark.parametrize("k", [0, 1, 3, 10, 31, 47])
def test_truncation_spectral_error_bound(k):
    """||C - C_k||_2 = S_{k+1}^2 / ||S||_2 (approx kind), with C_k from the truncated SVD."""
    gen = torch.Generator().manual_seed(30 + k)
    V = make_V(48, 64, gen, floor=0.01).to(F64)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    fro = float(torch.linalg.norm(V))
    assert fro == pytest.approx(float(torch.linalg.norm(S)), rel=1e-12)
    C = ref.approx_operator(V, F64)
    Ck = ref.operator_from_svd(U[:, :k], S[:k], fro, "approx", F64)
    expected = float(S[k]) ** 2 / fro if k < len(S) else 0.0
    assert float(torch.linalg.matrix_norm(C - Ck, ord=2)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------


def test_round_cosine_matches_numpy_on_data():
    gen = torch.Generator().manual_seed(40)
    xs = (torch.rand(20000, generator=gen, dtype=F64) * 2 - 1).tolist()
    assert all(round_cosine(x) == float(numpy.round(x, 5)) for x in xs)


def test_round_cosine_matches_numpy_on_half_way_values():
    for x in [0.763005, -0.763005, 0.123455, 0.350005]:
        assert round_cosine(x) == float(numpy.round(x, 5)), x


# --------------------------------------------------------------------------
# Large module: the fast path is at least as accurate as the paper's float32 dense arithmetic
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_large_module_fast_path_at_least_as_close_to_float64():
    """1024 x 1024, r = 8 (design brief section 6), against float64 dense ground truth.

    The cosine from the fast path (float64 r x r traces) is orders of magnitude closer than
    the paper's float32 flattened cosine. For C B, the fast path is only as accurate as the
    SVD it is given: from a float32 SVD it is about as close as the float32 dense C (the
    SVD's own float32 error dominates at this size), from a float64 SVD (cast to float32)
    it is about 10x closer.
    """
    gen = torch.Generator().manual_seed(50)
    d, r = 1024, 8
    V = (torch.randn(d, d, generator=gen) * 0.02).to(F32)
    A, B = make_lora(d, d, r, gen)

    C64 = ref.approx_operator(V, F64)
    r64 = ref.score_module(C64, A, B, F64)
    del C64
    r32 = ref.score_module(ref.approx_operator(V, F32), A, B, F32)
    err_B_dense = rel_err(r32.W, r64.W)
    err_cos_dense = abs(r32.cosine_raw - r64.cosine_raw)

    fast32 = analyze_module("m", make_subspace(V), A, B, 2.0, ProjectionKind.APPROX)
    U, S, _ = torch.linalg.svd(V.to(F64), full_matrices=False)
    sub64 = Subspace(U=U.to(F32), S=S.to(F32), frobenius_norm=float(torch.linalg.norm(V.to(F64))))
    fast64 = analyze_module("m", sub64, A, B, 2.0, ProjectionKind.APPROX)

    line = f"\ndense32: C B rel err {err_B_dense:.2e}, cosine err {err_cos_dense:.2e}"
    for label, fast in (("fast/svd32", fast32), ("fast/svd64", fast64)):
        e_B, e_cos = rel_err(fast.projected_B, r64.W), abs(fast.score.cosine - r64.cosine_raw)
        line += f"\n{label}: C B rel err {e_B:.2e}, cosine err {e_cos:.2e}"
        assert e_cos <= max(err_cos_dense, 1e-7) and e_cos < 1e-6
    print(line)
    assert rel_err(fast32.projected_B, r64.W) <= 1.5 * err_B_dense
    assert rel_err(fast64.projected_B, r64.W) <= err_B_dense / 4
