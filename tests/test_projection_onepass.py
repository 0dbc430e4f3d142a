"""The one-pass scorer (X = U^T B), batching per shape and reduced-precision banks.

Every figure is checked against the dense float64 reference (tests/dense_reference.py):
C materialised from the same (possibly rounded) U, dW = s B A formed densely.
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dense_reference as ref  # noqa: E402

from vllm_safelora import projection  # noqa: E402
from vllm_safelora.projection import (  # noqa: E402
    ModuleInput,
    ProjectionKind,
    Subspace,
    analyze_module,
    analyze_modules,
    apply_operator,
)

F64 = torch.float64
KINDS = [ProjectionKind.APPROX, ProjectionKind.EXACT]


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]


def _subspace(
    d_out: int, d_in: int, gen: torch.Generator, *, keep: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Subspace, torch.Tensor]:
    """A subspace from an exact SVD; returns it and V (float64) for the reference."""
    k = min(d_out, d_in)
    S = 0.05 + torch.exp(-torch.arange(k, dtype=F64) / (k / 4))
    U = _orthonormal(d_out, k, gen)
    V = U @ torch.diag(S) @ _orthonormal(d_in, k, gen).T
    fro = float(torch.linalg.norm(V))
    keep = k if keep is None else keep
    return Subspace(U=U[:, :keep].to(dtype).contiguous(), S=S[:keep].float(), frobenius_norm=fro), V


def _lora(d_out: int, d_in: int, r: int, gen: torch.Generator, inside: torch.Tensor | None = None):
    A = torch.randn(r, d_in, generator=gen, dtype=F64) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=gen, dtype=F64) * 0.01
    if inside is not None:  # B entirely inside span(inside): an update the exact C keeps whole
        B = inside @ (inside.T @ B)
    return A.float(), B.float()


def _dense(sub: Subspace, A: torch.Tensor, B: torch.Tensor, kind: ProjectionKind, scale: float = 1.0) -> dict:
    """The reference's figures with C built densely from the subspace's own U (as stored, in float64)."""
    C = ref.operator_from_svd(sub.U.to(F64), sub.S.to(F64), sub.frobenius_norm, kind.value, F64)
    if kind is ProjectionKind.EXACT:
        C = sub.U.to(F64) @ torch.diag(sub.weights(kind).to(F64)) @ sub.U.to(F64).T
    m = ref.dense_update_metrics(C, A, B, scale)
    CB = C @ B.to(F64)
    return {
        "cosine": m["inner"] / math.sqrt(m["norm_dw_sq"] * m["norm_cdw_sq"]),
        "relative_distance": math.sqrt(m["dist_dw_sq"] / m["norm_dw_sq"]),
        "distance_B": float(torch.linalg.norm(CB - B.to(F64))),
        "projected_B_norm": float(torch.linalg.norm(CB)),
        "CB": CB,
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_out,d_in,keep", [(96, 96, None), (128, 64, None), (64, 128, None), (96, 96, 24)])
def test_one_pass_scores_match_the_dense_reference(kind, d_out, d_in, keep):
    gen = torch.Generator().manual_seed(d_out * 7 + d_in + (keep or 0))
    sub, _ = _subspace(d_out, d_in, gen, keep=keep)
    A, B = _lora(d_out, d_in, 8, gen)
    got = analyze_module("m", sub, A, B, 2.0, kind)
    want = _dense(sub, A, B, kind, 2.0)
    assert got.score.cosine == pytest.approx(want["cosine"], abs=2e-6)
    assert got.score.relative_distance == pytest.approx(want["relative_distance"], abs=2e-5)
    assert got.score.distance_B == pytest.approx(want["distance_B"], rel=1e-4, abs=1e-6)
    assert got.score.projected_B_norm == pytest.approx(want["projected_B_norm"], rel=1e-5)
    assert torch.allclose(got.projected_B.to(F64), want["CB"], rtol=0, atol=1e-6 * float(want["CB"].abs().max()))


@pytest.mark.parametrize("keep", [None, 16, 40])
def test_no_cancellation_when_the_update_lies_inside_the_subspace(keep):
    """exact C keeps such an update whole: ||(C - I) dW|| is 0, and the scorer must not report
    the round-off of ||C dW||^2 - 2 <C dW, dW> + ||dW||^2 (~sqrt(eps32) ~ 3e-4) instead."""
    gen = torch.Generator().manual_seed(5 + (keep or 0))
    sub, _ = _subspace(64, 64, gen, keep=keep)
    A, B = _lora(64, 64, 8, gen, inside=sub.U.to(F64))
    got = analyze_module("m", sub, A, B, 1.0, ProjectionKind.EXACT).score
    want = _dense(sub, A, B, ProjectionKind.EXACT)
    assert want["relative_distance"] < 1e-6
    # Full basis: exactly no outside part. Truncated: the outside Gram H - X^T X is a float32 difference.
    assert got.relative_distance <= (1e-6 if keep is None else 2e-3)
    assert got.cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("staging", [64, 4096, 1 << 20])
def test_reduced_precision_bank_is_read_in_blocks_with_float32_accumulation(monkeypatch, dtype, staging):
    """A bfloat16/float16 U used as stored, read in blocks of any size (edges that do not divide
    d_out included), gives what the same rounded U gives in float32."""
    monkeypatch.setattr(projection, "STAGING_BYTES", staging)
    gen = torch.Generator().manual_seed(11)
    sub, _ = _subspace(100, 80, gen, dtype=dtype)
    as_f32 = Subspace(U=sub.U.float(), S=sub.S, frobenius_norm=sub.frobenius_norm)
    A, B = _lora(100, 80, 4, gen)
    got = analyze_module("m", sub, A, B, 1.0, ProjectionKind.APPROX)
    want = analyze_module("m", as_f32, A, B, 1.0, ProjectionKind.APPROX)
    assert got.weighted.dtype == torch.float32
    assert got.score.cosine == pytest.approx(want.score.cosine, abs=1e-6)
    assert got.score.relative_distance == pytest.approx(want.score.relative_distance, abs=1e-6)
    assert torch.allclose(got.projected_B, want.projected_B, rtol=1e-5, atol=1e-8)
    assert torch.allclose(apply_operator(sub, B, ProjectionKind.APPROX), want.projected_B, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype,cos_tol", [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
def test_reduced_precision_bank_against_the_float64_truth(dtype, cos_tol):
    """Rounding U to 8 (bfloat16) or 11 (float16) bits moves the cosine by ~1e-4 / ~1e-5 at this size:
    the bank's rounding, not the scorer's (benchmarks/projection_speed.py measures it at Llama shapes)."""
    gen = torch.Generator().manual_seed(12)
    sub64, _ = _subspace(256, 256, gen, dtype=F64)
    A, B = _lora(256, 256, 8, gen)
    truth = _dense(sub64, A, B, ProjectionKind.APPROX)
    rounded = Subspace(U=sub64.U.to(dtype), S=sub64.S, frobenius_norm=sub64.frobenius_norm)
    got = analyze_module("m", rounded, A, B, 1.0, ProjectionKind.APPROX)
    assert got.score.cosine == pytest.approx(truth["cosine"], abs=cos_tol)
    assert float(torch.linalg.norm(got.projected_B.to(F64) - truth["CB"])) <= 50 * cos_tol * float(
        torch.linalg.norm(truth["CB"])
    )


def _stacked_bank(n: int, d_out: int, d_in: int, gen: torch.Generator, dtype=torch.float32) -> list[Subspace]:
    """Subspaces whose U's are views of one (n, d_out, k) tensor, the way bank.load stores them."""
    subs = [_subspace(d_out, d_in, gen, dtype=dtype)[0] for _ in range(n)]
    stack = torch.stack([s.U for s in subs])
    return [Subspace(U=stack[i], S=s.S, frobenius_norm=s.frobenius_norm) for i, s in enumerate(subs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pick", [range(8), range(0, 8, 3), [0, 1, 2, 5, 6, 7], [7, 3]])
def test_batched_scoring_equals_one_module_at_a_time(dtype, pick):
    """Runs at a constant stride are one batched product; gaps and odd orders split the runs.
    Results are those of the one-module path, mixed shapes and ranks included."""
    gen = torch.Generator().manual_seed(3)
    subs = _stacked_bank(8, 48, 40, gen, dtype)
    other = _subspace(32, 40, gen)[0]
    items = []
    for i in pick:
        A, B = _lora(48, 40, 4, gen)
        items.append(ModuleInput(f"q{i}", subs[i], A, B, 1.5))
    A, B = _lora(32, 40, 2, gen)
    items.append(ModuleInput("v", other, A, B, 1.0))
    batched = analyze_modules(items, ProjectionKind.APPROX)
    assert list(batched) == [it.name for it in items] or set(batched) == {it.name for it in items}
    for it in items:
        alone = analyze_module(
            it.name,
            Subspace(U=it.sub.U.clone(), S=it.sub.S, frobenius_norm=it.sub.frobenius_norm),
            it.lora_A,
            it.lora_B,
            it.scale,
            ProjectionKind.APPROX,
        )
        got = batched[it.name]
        assert got.score.cosine == pytest.approx(alone.score.cosine, abs=1e-6)
        assert got.score.relative_distance == pytest.approx(alone.score.relative_distance, abs=1e-6)
        assert torch.allclose(got.projected_B, alone.projected_B, atol=1e-7)


def test_stacked_runs_batch_without_copying():
    """Modules at a constant stride in one storage form a single run whose view shares the storage."""
    gen = torch.Generator().manual_seed(4)
    subs = _stacked_bank(6, 16, 16, gen)
    items = [ModuleInput(f"m{i}", subs[i], *_lora(16, 16, 2, gen), 1.0) for i in (0, 2, 4)]
    runs = list(projection._stacked_runs(items))
    assert len(runs) == 1
    run, view = runs[0]
    assert [it.name for it in run] == ["m0", "m2", "m4"]
    assert view.untyped_storage().data_ptr() == subs[0].U.untyped_storage().data_ptr()
    assert torch.equal(view[1], subs[2].U)


def test_projected_B_is_computed_only_when_asked_for(monkeypatch):
    """Scoring is one pass over U; C B (the second pass) runs for the modules a policy changes."""
    calls = []
    real = projection.expand
    monkeypatch.setattr(projection, "expand", lambda U, Y: calls.append(1) or real(U, Y))
    gen = torch.Generator().manual_seed(6)
    sub, _ = _subspace(32, 32, gen)
    a = analyze_module("m", sub, *_lora(32, 32, 4, gen), 1.0, ProjectionKind.APPROX)
    assert calls == []
    first = a.projected_B
    assert a.projected_B is first and calls == [1]
