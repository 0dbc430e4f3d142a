"""project_adapter / write_projected on PEFT-made adapters, checked against a dense float64 reference."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from vllm_safelora.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from vllm_safelora.adapters import writer as adapter_writer
from vllm_safelora.bank import AlignmentBank, Truncation, build_bank, load_bank
from vllm_safelora.apply_policy import check_compatible, project_adapter, write_projected
from vllm_safelora.errors import AdapterRefused, RefusalReason
from vllm_safelora.policies import SafeLoRAConfig
from vllm_safelora.projection import round_cosine
from vllm_safelora.report import REPORT_FILE, AdapterReport

PREFIX = "base_model.model."
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------------
# Dense float64 reference


def dense_C(V: torch.Tensor, kind: str = "approx", keep: int | None = None) -> torch.Tensor:
    """C (approx: V V^T / ||V||_F) or C_hat (exact: U U^T), float64; ``keep``: top singular directions only."""
    V = V.double()
    if kind == "approx" and keep is None:
        return V @ V.T / torch.linalg.norm(V)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    if keep is None:  # exact over the bank's notion of non-zero singular values
        keep = int((S > float(S.max()) * max(V.shape) * torch.finfo(torch.float32).eps).sum())
    w = S[:keep] ** 2 / torch.linalg.norm(V) if kind == "approx" else torch.ones(keep, dtype=torch.float64)
    return U[:, :keep] @ torch.diag(w) @ U[:, :keep].T


def bank_dense_C(bank, deltas, name: str, kind: str) -> torch.Tensor:
    """The dense operator the bank stands for: untruncated C for a full bank, C_k for a truncated one."""
    meta = bank.manifest.module(name)
    truncated = bank.manifest.truncation.get("rank") or bank.manifest.truncation.get("energy")
    return dense_C(deltas[name], kind, keep=meta.rank_kept if (truncated or kind == "exact") else None)


def dense_cosine(C: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    dW = B.double() @ A.double()
    CdW = C @ dW
    return float((CdW * dW).sum() / (torch.linalg.norm(CdW) * torch.linalg.norm(dW)))


def conditioning(C: torch.Tensor, B: torch.Tensor, A: torch.Tensor, C_norm: float) -> float:
    """||C dW|| / (||C||_2 ||dW||): how much of the update C sees at all.

    An update (nearly) orthogonal to the alignment subspace meets only the round-off
    tail of C; its cosine is then set by directions the bank drops as numerical noise
    (their total weight is the manifest's error bound), so only well-conditioned
    cosines are compared with the dense value.
    """
    dW = B.double() @ A.double()
    return float(torch.linalg.norm(C @ dW) / (C_norm * torch.linalg.norm(dW)))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - ref.double()) / torch.linalg.norm(ref.double()))


def outcome_tensors(outcome) -> dict[str, torch.Tensor]:
    return st_load(outcome.adapter.weights_bytes)


def selection_rule(rounded: dict[str, float], policy: SafeLoRAConfig) -> set[str]:
    if policy.select.value == "all":
        return set(rounded)
    if policy.select.value == "topk" and policy.topk == 0:
        return set()
    tau = policy.threshold if policy.select.value == "threshold" else sorted(rounded.values())[: policy.topk][-1]
    return {n for n, c in rounded.items() if c <= tau}


def expected_selection(adapter, deltas, policy: SafeLoRAConfig) -> tuple[dict[str, float], set[str]]:
    """Dense cosines (full C) and the modules the reference rule picks from them."""
    cos = {
        name: round_cosine(dense_cosine(dense_C(deltas[name], policy.projection.value), m.lora_B, m.lora_A))
        for name, m in adapter.modules.items()
    }
    return cos, selection_rule(cos, policy)


def check_projection(adapter, outcome, bank, deltas, policy: SafeLoRAConfig, tol: float) -> set[str]:
    """Every module: lora_A unchanged; lora_B = C lora_B if selected, else unchanged bytes.

    The selection must follow the reference rule on the reported (rounded) cosines, and
    every well-conditioned cosine must match the dense float64 one.
    """
    kind = policy.projection.value
    out = outcome_tensors(outcome)
    assert sorted(out) == sorted(adapter.tensors)
    by_module = {r.module: r for r in outcome.report.modules}
    assert set(by_module) == set(adapter.modules)
    selected = selection_rule({n: r.cosine for n, r in by_module.items()}, policy)
    for name, m in adapter.modules.items():
        r = by_module[name]
        C = bank_dense_C(bank, deltas, name, kind)
        C_norm = float(torch.linalg.matrix_norm(C, ord=2))
        assert r.projected == (name in selected), name
        assert r.cosine == round_cosine(r.cosine_raw)
        if conditioning(C, m.lora_B, m.lora_A, C_norm) > 1e-3:
            assert r.cosine_raw == pytest.approx(dense_cosine(C, m.lora_B, m.lora_A), abs=1e-5), name
        else:
            assert abs(r.cosine_raw) < 0.35, name
        assert out[m.a_key].dtype == m.lora_A.dtype and torch.equal(out[m.a_key], m.lora_A)
        new_B = out[m.b_key]
        assert new_B.dtype == m.lora_B.dtype and new_B.shape == m.lora_B.shape
        if name in selected:
            ref = C @ m.lora_B.double()
            err = float(torch.linalg.norm(new_B.double() - ref))
            scale = C_norm * float(torch.linalg.norm(m.lora_B.double()))
            assert err <= tol * scale, (name, err / scale)
        else:
            assert torch.equal(new_B, m.lora_B), name
    return selected


@pytest.fixture(scope="module")
def rank4_bank(tiny_models, tmp_path_factory):
    """The tiny bank truncated to its 4 real alignment directions (where exact mode means something)."""
    out = tmp_path_factory.mktemp("rank4") / "bank"
    build_bank(str(tiny_models.base), str(tiny_models.aligned), out, truncation=Truncation(rank=4), progress=None)
    return load_bank(out)


# ---------------------------------------------------------------------------
# Projection results


@pytest.mark.parametrize(
    "direction,policy,bank_name",
    [
        ("random", SafeLoRAConfig(), "full"),  # threshold 0.35: every module projected
        ("orthogonal", SafeLoRAConfig(), "full"),
        ("random", SafeLoRAConfig(select="topk", topk=1), "full"),
        ("random", SafeLoRAConfig(select="topk", topk=3), "full"),
        ("aligned", SafeLoRAConfig(select="all"), "full"),
        ("aligned", SafeLoRAConfig(select="threshold", threshold=0.92), "full"),
        ("random", SafeLoRAConfig(select="all"), "rank4"),
        ("aligned", SafeLoRAConfig(select="all", projection="exact"), "rank4"),
        ("random", SafeLoRAConfig(select="topk", topk=2, projection="exact"), "rank4"),
        ("orthogonal", SafeLoRAConfig(select="threshold", threshold=0.5, projection="exact"), "rank4"),
    ],
)
def test_projected_lora_B_matches_dense(
    tiny_adapter_factory, tiny_bank, rank4_bank, tiny_deltas, direction, policy, bank_name
):
    bank = tiny_bank if bank_name == "full" else rank4_bank
    adapter = read_adapter(tiny_adapter_factory(direction))
    outcome = project_adapter(adapter, bank, policy)
    selected = check_projection(adapter, outcome, bank, tiny_deltas, policy, tol=1e-5)
    s = outcome.report.summary
    assert s.projected == len(selected) and s.modules == len(adapter.modules)
    if policy.select.value == "topk":
        assert len(selected) >= policy.topk
    if direction != "orthogonal":  # well-conditioned: the dense cosines pick the same modules
        dense_cos = {
            n: round_cosine(
                dense_cosine(bank_dense_C(bank, tiny_deltas, n, policy.projection.value), m.lora_B, m.lora_A)
            )
            for n, m in adapter.modules.items()
        }
        assert selected == selection_rule(dense_cos, policy)
    assert s.outcome == ("modified" if selected else "unchanged")
    assert s.bank_id == bank.bank_id


def test_threshold_selection_mixes(tiny_adapter_aligned, tiny_bank, tiny_deltas):
    adapter = read_adapter(tiny_adapter_aligned)
    cos, _ = expected_selection(adapter, tiny_deltas, SafeLoRAConfig(select="all"))
    tau = sorted(cos.values())[1]  # the two lowest
    policy = SafeLoRAConfig(threshold=tau)
    outcome = project_adapter(adapter, tiny_bank, policy)
    selected = check_projection(adapter, outcome, tiny_bank, tiny_deltas, policy, tol=1e-5)
    assert 0 < len(selected) < len(adapter.modules)
    assert selected == {n for n, c in cos.items() if c <= tau}


def test_all_attention_and_mlp_modules(tiny_adapter_factory, tiny_bank, tiny_deltas):
    path = tiny_adapter_factory(
        "random", target_modules=ATTN + ("gate_proj", "up_proj", "down_proj"), rank=4, alpha=8, seed=3
    )
    adapter = read_adapter(path)
    assert len(adapter.modules) == 14
    policy = SafeLoRAConfig(select="all")
    check_projection(adapter, project_adapter(adapter, tiny_bank, policy), tiny_bank, tiny_deltas, policy, tol=1e-5)


def test_rslora_and_patterns(tiny_adapter_factory, tiny_bank, tiny_deltas):
    path = tiny_adapter_factory(
        "orthogonal",
        target_modules=ATTN,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "layers.1.self_attn.v_proj": 2},
        alpha_pattern={"v_proj": 4},
    )
    adapter = read_adapter(path)
    policy = SafeLoRAConfig(select="topk", topk=4)
    outcome = project_adapter(adapter, tiny_bank, policy)
    check_projection(adapter, outcome, tiny_bank, tiny_deltas, policy, tol=1e-5)
    by = {r.module: r for r in outcome.report.modules}
    for name, m in adapter.modules.items():
        assert by[name].rank == m.rank and by[name].scale == pytest.approx(m.scale)
        assert by[name].shape == (m.d_out, m.d_in)
        dW = m.scale * m.lora_B.double() @ m.lora_A.double()
        assert by[name].update_norm == pytest.approx(float(torch.linalg.norm(dW)), rel=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_projected_in_float32_and_cast_back(tiny_adapter_factory, tiny_bank, tiny_deltas, dtype, tol):
    adapter = read_adapter(tiny_adapter_factory("random", dtype=dtype))
    assert adapter.dtype == dtype
    policy = SafeLoRAConfig(select="all")
    outcome = project_adapter(adapter, tiny_bank, policy)
    check_projection(adapter, outcome, tiny_bank, tiny_deltas, policy, tol=tol)
    out = outcome_tensors(outcome)
    for name, m in adapter.modules.items():
        # float32 product of the (exactly representable) half-precision B, then one rounding
        ref32 = (dense_C(tiny_deltas[name]) @ m.lora_B.double()).float()
        diff = (out[m.b_key].float() - ref32).abs()
        ulp = torch.finfo(dtype).eps * ref32.abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool((diff <= ulp + 1e-6 * float(ref32.abs().max())).all()), name


def test_unchanged_adapter_bytes_are_the_input(tiny_adapter_aligned, tiny_bank):
    adapter = read_adapter(tiny_adapter_aligned)
    outcome = project_adapter(adapter, tiny_bank, SafeLoRAConfig())  # aligned: every cosine > 0.35
    s = outcome.report.summary
    assert s.outcome == "unchanged" and s.projected == 0
    assert outcome.adapter.weights_bytes == (tiny_adapter_aligned / WEIGHTS_FILE).read_bytes()
    assert outcome.adapter.config_bytes == (tiny_adapter_aligned / CONFIG_FILE).read_bytes()
    assert s.output_hash == s.input_hash == adapter.content_hash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unchanged_half_precision_adapter_bytes(tiny_adapter_factory, tiny_bank, dtype):
    path = tiny_adapter_factory("aligned", dtype=dtype)
    outcome = project_adapter(read_adapter(path), tiny_bank, SafeLoRAConfig(select="topk", topk=0))
    assert outcome.adapter.weights_bytes == (path / WEIGHTS_FILE).read_bytes()
    assert outcome.report.summary.output_hash == outcome.report.summary.input_hash


def test_report_fields(tiny_adapter_random, tiny_bank, tiny_deltas, tmp_path):
    adapter = read_adapter(tiny_adapter_random)
    policy = SafeLoRAConfig(select="topk", topk=2)
    t0 = time.perf_counter()
    outcome = project_adapter(adapter, tiny_bank, policy, name="tenant/bot")
    wall = time.perf_counter() - t0
    report = outcome.report
    s = report.summary
    cos, selected = expected_selection(adapter, tiny_deltas, policy)

    assert report.adapter == "tenant/bot" and report.format_version == 1
    assert s.modules == len(adapter.modules) == 4
    assert s.projected == len(selected) == sum(r.projected for r in report.modules)
    assert s.policy_name == "safelora"
    assert s.policy == {"kind": "safelora", "select": "topk", "threshold": 0.35, "topk": 2, "projection": "approx"}
    assert s.policy_id == policy.policy_id() and len(s.policy_id) == 16
    assert s.bank_id == tiny_bank.bank_id
    assert s.input_hash == adapter.content_hash
    # the output hash names the files that are served: the written adapter, read back
    assert read_adapter(write_projected(outcome, tmp_path / "served")).content_hash == s.output_hash
    assert s.output_hash != s.input_hash
    assert s.min_cosine == pytest.approx(min(cos.values()), abs=2e-5)
    assert s.mean_cosine == pytest.approx(sum(cos.values()) / len(cos), abs=2e-5)
    assert 0 < s.seconds <= wall and s.refusal is None  # the projection's own time, inside the call
    assert s.max_bank_error_bound == max(tiny_bank.manifest.module(n).approx_error_bound for n in adapter.modules)

    # Pdst: 1 for projected modules, 1 / (1 + ||C B - B||_F) for kept ones (dense)
    terms = []
    for r in report.modules:
        m = adapter.modules[r.module]
        C = dense_C(tiny_deltas[r.module])
        B = m.lora_B.double()
        expected_term = 1.0 if r.projected else 1.0 / (1.0 + float(torch.linalg.norm(C @ B - B)))
        assert r.pdst_term == pytest.approx(expected_term, rel=1e-5)
        dW = B @ m.lora_A.double()
        assert r.relative_distance == pytest.approx(
            float(torch.linalg.norm(C @ dW - dW) / torch.linalg.norm(dW)), rel=1e-5
        )
        assert r.cosine_raw == pytest.approx(dense_cosine(C, m.lora_B, m.lora_A), abs=1e-6)
        terms.append(expected_term)
    assert s.mean_pdst == pytest.approx(sum(terms) / len(terms), rel=1e-6)

    # the report travels with the adapter and says the same
    files = outcome.adapter.extra_files
    assert set(files) == {REPORT_FILE}
    assert AdapterReport.model_validate_json(files[REPORT_FILE]) == report
    assert "PROJECT" in report.table() and "keep" in report.table()


def test_project_adapter_writes_nothing(tiny_adapter_factory, tiny_bank, tmp_path):
    src = tiny_adapter_factory.copy_to(tmp_path / "a", "random")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    project_adapter(read_adapter(src), tiny_bank, SafeLoRAConfig(select="all"))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["a"]


# ---------------------------------------------------------------------------
# Compatibility refusals


def _with_config(factory, dest: Path, **changes) -> Path:
    d = factory.copy_to(dest, "random")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    return d


def test_base_model_mismatch_refused_and_alias_accepts(tiny_adapter_factory, tiny_bank, tmp_path):
    d = _with_config(tiny_adapter_factory, tmp_path / "a", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    adapter = read_adapter(d)
    with pytest.raises(AdapterRefused) as info:
        project_adapter(adapter, tiny_bank, SafeLoRAConfig(), name="tenant/x")
    exc = info.value
    assert exc.reason is RefusalReason.BASE_MODEL_MISMATCH
    assert "tenant/x" in str(exc) and "meta-llama/Llama-2-7b-hf" in str(exc)
    assert tiny_bank.manifest.aligned.ref in str(exc)

    ok = project_adapter(adapter, tiny_bank, SafeLoRAConfig(), aliases=["meta-llama/Llama-2-7b-hf"])
    assert ok.report.summary.modules == 4
    ok = project_adapter(adapter, tiny_bank, SafeLoRAConfig(), require_base_model_match=False)
    assert ok.report.summary.modules == 4
    # an alias recorded in the bank's manifest works the same
    aliased = AlignmentBank(
        manifest=tiny_bank.manifest.model_copy(update={"aliases": ["meta-llama/Llama-2-7b-hf"]}),
        subspaces=tiny_bank.subspaces,
        device=tiny_bank.device,
        nbytes=tiny_bank.nbytes,
        path=tiny_bank.path,
    )
    check_compatible(adapter, aliased)


def test_adapter_for_the_base_model_refused(tiny_adapter_factory, tiny_bank, tiny_models, tmp_path):
    d = _with_config(tiny_adapter_factory, tmp_path / "a", base_model_name_or_path=str(tiny_models.base))
    with pytest.raises(AdapterRefused) as info:
        project_adapter(read_adapter(d), tiny_bank, SafeLoRAConfig())
    assert info.value.reason is RefusalReason.BASE_MODEL_MISMATCH


def test_missing_base_model_refused(tiny_adapter_factory, tiny_bank, tmp_path):
    d = _with_config(tiny_adapter_factory, tmp_path / "a", base_model_name_or_path=None)
    adapter = read_adapter(d)
    with pytest.raises(AdapterRefused) as info:
        project_adapter(adapter, tiny_bank, SafeLoRAConfig())
    assert info.value.reason is RefusalReason.BASE_MODEL_MISMATCH
    assert "base_model_name_or_path" in str(info.value) and str(d) in str(info.value)
    project_adapter(adapter, tiny_bank, SafeLoRAConfig(), require_base_model_match=False)


def _rewrite_tensors(d: Path, fn) -> Path:
    path = d / WEIGHTS_FILE
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})
    return d


def test_unknown_module_refused(tiny_adapter_factory, tiny_bank, tmp_path):
    d = tiny_adapter_factory.copy_to(tmp_path / "a", "random")
    _rewrite_tensors(d, lambda sd: {k.replace("layers.1.", "layers.7."): v for k, v in sd.items()})
    with pytest.raises(AdapterRefused) as info:
        project_adapter(read_adapter(d), tiny_bank, SafeLoRAConfig())
    exc = info.value
    assert exc.reason is RefusalReason.UNKNOWN_MODULE
    assert "model.layers.7.self_attn.q_proj" in str(exc) and "model.layers.7.self_attn.v_proj" in str(exc)
    assert tiny_bank.bank_id in str(exc)


def test_module_outside_a_partial_bank_refused(tiny_models, tiny_adapter_random, tmp_path):
    build_bank(str(tiny_models.base), str(tiny_models.aligned), tmp_path / "bank", modules=["q_proj"], progress=None)
    bank = load_bank(tmp_path / "bank")
    with pytest.raises(AdapterRefused) as info:
        project_adapter(read_adapter(tiny_adapter_random), bank, SafeLoRAConfig())
    assert info.value.reason is RefusalReason.UNKNOWN_MODULE
    assert "model.layers.0.self_attn.v_proj" in str(info.value)


def test_shape_mismatch_refused(tiny_adapter_factory, tiny_bank, tmp_path):
    d = tiny_adapter_factory.copy_to(tmp_path / "a", "random")
    name = "model.layers.0.self_attn.q_proj"

    def narrow(sd):
        sd[f"{PREFIX}{name}.lora_A.weight"] = sd[f"{PREFIX}{name}.lora_A.weight"][:, :64].contiguous()
        return sd

    _rewrite_tensors(d, narrow)
    with pytest.raises(AdapterRefused) as info:
        project_adapter(read_adapter(d), tiny_bank, SafeLoRAConfig())
    exc = info.value
    assert exc.reason is RefusalReason.SHAPE_MISMATCH
    assert name in str(exc) and "128 x 64" in str(exc) and "128 x 128" in str(exc)


def test_v_lora_on_q_shape_refused(tiny_adapter_factory, tiny_bank, tmp_path):
    """Grouped-query shapes: a v_proj update (64 rows) filed under q_proj (128 rows)."""
    d = tiny_adapter_factory.copy_to(tmp_path / "a", "random", target_modules=("v_proj",))
    _rewrite_tensors(d, lambda sd: {k.replace("v_proj", "q_proj"): v for k, v in sd.items()})
    with pytest.raises(AdapterRefused) as info:
        project_adapter(read_adapter(d), tiny_bank, SafeLoRAConfig())
    assert info.value.reason is RefusalReason.SHAPE_MISMATCH
    assert "64 x 128" in str(info.value)


# ---------------------------------------------------------------------------
# Exact projection on a full-rank bank


@pytest.fixture(scope="module")
def full_rank_setup(tmp_path_factory):
    """Hand-made checkpoints whose V is full rank: q_proj wide (16 x 32), gate_proj tall (32 x 16)."""
    root = tmp_path_factory.mktemp("fullrank")
    g = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.self_attn.q_proj": (16, 32), "model.layers.0.mlp.gate_proj": (32, 16)}
    base = {f"{m}.weight": torch.randn(*s, generator=g) for m, s in shapes.items()}
    aligned = {k: v + 0.5 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    for name, sd in (("base", base), ("aligned", aligned)):
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
    build_bank(str(root / "base"), str(root / "aligned"), root / "bank", progress=None)
    adapter = root / "adapter"
    adapter.mkdir()
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "base_model_name_or_path": str(root / "aligned"),
        "target_modules": ["q_proj", "gate_proj"],
    }
    (adapter / CONFIG_FILE).write_text(json.dumps(cfg))
    tensors = {}
    for m, (d_out, d_in) in shapes.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(4, d_in, generator=g)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(d_out, 4, generator=g)
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    deltas = {m: aligned[f"{m}.weight"] - base[f"{m}.weight"] for m in shapes}
    return load_bank(root / "bank"), adapter, deltas


def test_exact_projection_note_on_full_rank_bank(full_rank_setup):
    bank, path, deltas = full_rank_setup
    for m in bank.manifest.modules:
        assert m.rank_kept == min(m.shape)  # full rank kept
    adapter = read_adapter(path)
    policy = SafeLoRAConfig(select="all", projection="exact")
    outcome = project_adapter(adapter, bank, policy)
    check_projection(adapter, outcome, bank, deltas, policy, tol=1e-5)
    out = outcome_tensors(outcome)
    wide, tall = adapter.modules["model.layers.0.self_attn.q_proj"], adapter.modules["model.layers.0.mlp.gate_proj"]
    # wide full-rank V: C_hat = I, the projection changes nothing (up to round-off)
    assert rel(out[wide.b_key], wide.lora_B) < 1e-5
    # tall full-rank V: C_hat projects 32-dim outputs onto a 16-dim subspace: not a no-op
    assert rel(out[tall.b_key], tall.lora_B) > 0.1
    notes = outcome.report.notes
    assert len(notes) == 1
    assert "identity" in notes[0] and "1 module(s)" in notes[0]
    assert "q_proj" in notes[0] and "gate_proj" not in notes[0]
    assert "--rank or --energy" in notes[0]
    # the approximate projection is never the identity: no note
    assert project_adapter(adapter, bank, SafeLoRAConfig(select="all")).report.notes == []


def test_no_exact_note_on_numerically_low_rank_bank(tiny_adapter_random, tiny_bank):
    outcome = project_adapter(read_adapter(tiny_adapter_random), tiny_bank, SafeLoRAConfig(projection="exact"))
    assert outcome.report.notes == []


# ---------------------------------------------------------------------------
# Writing, and what PEFT makes of the result


def test_written_adapter_merges_in_peft_to_dense_reference(
    tiny_adapter_random, tiny_models, tiny_bank, tiny_deltas, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = read_adapter(tiny_adapter_random)
    policy = SafeLoRAConfig(select="topk", topk=2)
    outcome = project_adapter(adapter, tiny_bank, policy)
    out = write_projected(outcome, tmp_path / "projected")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE]
    assert (out / CONFIG_FILE).read_bytes() == (tiny_adapter_random / CONFIG_FILE).read_bytes()
    assert json.loads((out / REPORT_FILE).read_text())["summary"]["output_hash"] == outcome.report.summary.output_hash
    assert read_adapter(out).content_hash == outcome.report.summary.output_hash

    base_sd = {
        k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(tiny_models.aligned)).state_dict().items()
    }
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_models.aligned)), str(out)
    ).merge_and_unload()
    merged_sd = merged.state_dict()
    projected = {r.module for r in outcome.report.modules if r.projected}
    assert 0 < len(projected) < len(adapter.modules)
    for key, W in base_sd.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module not in adapter.modules:
            assert torch.equal(merged_sd[key], W), key
            continue
        m = adapter.modules[module]
        B = m.lora_B.double()
        if module in projected:
            B = dense_C(tiny_deltas[module]) @ B
        expected = W.double() + m.scale * B @ m.lora_A.double()
        assert rel(merged_sd[key], expected) < 1e-6, module
        # and it differs from the unprojected merge exactly where projected
        unprojected = W.double() + m.scale * m.lora_B.double() @ m.lora_A.double()
        assert (rel(merged_sd[key], unprojected) > 1e-3) == (module in projected), module


def _fail_after_files(monkeypatch):
    real = adapter_writer.write_adapter_files

    def fail(directory, adapter):
        real(directory, adapter)  # every file written and fsynced ...
        raise OSError("disk full")  # ... then the rename never happens

    monkeypatch.setattr(adapter_writer, "write_adapter_files", fail)


def _fail_mid_file(monkeypatch):
    calls = [0]
    real_fsync = os.fsync

    def flaky_fsync(fd):
        calls[0] += 1
        if calls[0] == 2:  # after the first file, during the second
            raise OSError("I/O error")
        return real_fsync(fd)

    monkeypatch.setattr(adapter_writer.os, "fsync", flaky_fsync)


@pytest.mark.parametrize("inject", [_fail_after_files, _fail_mid_file])
def test_write_projected_is_atomic(tiny_adapter_random, tiny_bank, tmp_path, monkeypatch, inject):
    outcome = project_adapter(read_adapter(tiny_adapter_random), tiny_bank, SafeLoRAConfig())
    parent = tmp_path / "out"
    parent.mkdir()
    inject(monkeypatch)
    with pytest.raises(OSError):
        write_projected(outcome, parent / "projected")
    assert os.listdir(parent) == []  # no output dir, no temp dir
    monkeypatch.undo()
    write_projected(outcome, parent / "projected")
    assert os.listdir(parent) == ["projected"]


def test_write_projected_failure_keeps_previous_output(tiny_adapter_random, tiny_bank, tmp_path, monkeypatch):
    outcome = project_adapter(read_adapter(tiny_adapter_random), tiny_bank, SafeLoRAConfig())
    out = write_projected(outcome, tmp_path / "projected")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_after_files(monkeypatch)
    with pytest.raises(OSError):
        write_projected(outcome, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["projected"]


def test_write_projected_refuses_existing_without_overwrite(tiny_adapter_random, tiny_bank, tmp_path):
    outcome = project_adapter(read_adapter(tiny_adapter_random), tiny_bank, SafeLoRAConfig())
    (tmp_path / "projected").mkdir()
    with pytest.raises(FileExistsError):
        write_projected(outcome, tmp_path / "projected")
    write_projected(outcome, tmp_path / "projected", overwrite=True)
    assert (tmp_path / "projected" / REPORT_FILE).is_file()
    shutil.rmtree(tmp_path / "projected")


@pytest.mark.parametrize(
    "old, outcome, refusal",
    [
        ({"outcome": "projected"}, "modified", None),
        ({"outcome": "rejected", "rejection": "too similar"}, "refused", "too similar"),
        ({"outcome": "unchanged"}, "unchanged", None),
        ({"outcome": "refused", "refusal": "x"}, "refused", "x"),
    ],
)
def test_reports_written_with_the_old_words_still_read(old, outcome, refusal):
    from vllm_safelora.report import ReportSummary

    fields = dict(
        modules=1,
        projected=0,
        mean_pdst=1.0,
        min_cosine=None,
        mean_cosine=None,
        policy_name="safelora",
        policy={},
        policy_id="p",
        bank_id="b",
        input_hash="0" * 64,
        output_hash=None,
        seconds=0.1,
        max_bank_error_bound=0.0,
    )
    summary = ReportSummary.model_validate({**fields, **old})
    assert (summary.outcome, summary.refusal, summary.rejection) == (outcome, refusal, refusal)
    dumped = summary.model_dump()
    assert dumped["outcome"] == outcome and "rejection" not in dumped and dumped["refusal"] == refusal


def test_an_unknown_outcome_is_still_refused_by_the_schema():
    from pydantic import ValidationError

    from vllm_safelora.report import ReportSummary

    with pytest.raises(ValidationError):
        ReportSummary.model_validate({"outcome": "projectd"})
