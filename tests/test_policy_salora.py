"""SaLoRA-style (post-hoc) projection: V_s collected offline vs by hand, lora_B' = (I - V_s V_s^T) lora_B."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys

import pytest
import torch
from safetensors.torch import load as st_load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from policy_helpers import ATTN, SMALL_PROMPTS, features_bank, hand_collected_features, projector, write_prompts  # noqa: E402

from vllm_safelora.adapters import read_adapter  # noqa: E402
from vllm_safelora.bank import load_bank, read_manifest  # noqa: E402
from vllm_safelora.apply_policy import project_adapter, write_projected  # noqa: E402
from vllm_safelora.errors import BankError  # noqa: E402
from vllm_safelora.policies import ChainConfig, SafeLoRAConfig, SaLoRAConfig, make_policy, parse_policy  # noqa: E402
from vllm_safelora.bank.safety_features import read_safety_prompts  # noqa: E402

RANK = 8
REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("salora_prompts") / "safety.jsonl")


@pytest.fixture(scope="module")
def sf_bank_dir(tiny_bank_dir, prompts, tmp_path_factory):
    return features_bank(tiny_bank_dir, tmp_path_factory.mktemp("salora") / "bank", prompts, RANK)


@pytest.fixture(scope="module")
def sf_bank(sf_bank_dir):
    return load_bank(sf_bank_dir, "cpu")


def test_features_match_hand_collected_outputs(sf_bank, tiny_models, prompts):
    modules = [m.name for m in sf_bank.manifest.modules]
    dense, n_tokens = hand_collected_features(tiny_models.aligned, SMALL_PROMPTS, modules, RANK)
    section = sf_bank.manifest.safety_features
    assert section.samples == len(SMALL_PROMPTS) and section.response_tokens == n_tokens
    assert section.rank == RANK and section.chat_template
    assert section.prompts_sha256 == hashlib.sha256(prompts.read_bytes()).hexdigest()
    for entry in section.modules:
        Vs = sf_bank.safety_features[entry.name]
        U, S = dense[entry.name]
        assert Vs.shape == (entry.d_out, RANK) == tuple(U.shape)
        assert torch.allclose(Vs.double().T @ Vs.double(), torch.eye(RANK, dtype=torch.float64), atol=1e-5)
        # same subspace (sign/rotation free); the batched, padded collection equals batch-1 by hand
        gap = float((S[RANK - 1] ** 2 - S[RANK] ** 2) / S[0] ** 2)
        assert gap > 1e-3  # well separated: the top-RANK subspace is well defined
        err = float(torch.linalg.matrix_norm(projector(Vs) - projector(U), ord=2))
        assert err < 1e-5, (entry.name, err, gap)
        energy = float((S[:RANK] ** 2).sum() / (S**2).sum())
        assert entry.energy_captured == pytest.approx(energy, rel=1e-6)


def test_projection_matches_dense_and_removes_safety_directions(sf_bank, tiny_adapter_factory):
    adapter = read_adapter(tiny_adapter_factory("random", target_modules=ATTN))
    outcome = project_adapter(adapter, sf_bank, SaLoRAConfig())
    tensors = st_load(outcome.adapter.weights_bytes)
    by = {r.module: r for r in outcome.report.modules}
    for name, m in adapter.modules.items():
        Vs = sf_bank.safety_features[name].double()
        B = m.lora_B.double()
        expected = B - Vs @ (Vs.T @ B)
        got = tensors[m.b_key].double()
        assert torch.allclose(got, expected, atol=1e-5 * float(B.abs().max()))
        assert float(torch.linalg.norm(Vs.T @ got)) <= 1e-5 * float(torch.linalg.norm(B))  # V_s^T B' = 0
        assert torch.equal(tensors[m.a_key], m.lora_A)  # lora_A untouched
        dW = m.scale * B @ m.lora_A.double()
        fraction = float(torch.linalg.norm(Vs @ (Vs.T @ dW)) / torch.linalg.norm(dW))
        assert by[name].salora_removed_fraction == pytest.approx(fraction, rel=1e-6)
        assert by[name].projected and not by[name].pruned
    s = outcome.report.summary
    assert s.outcome == "modified" and s.projected == len(adapter.modules)
    assert s.features_id == sf_bank.features_id and s.features_id.startswith("sf-")
    assert s.policy_id == SaLoRAConfig().policy_id(sf_bank) != SaLoRAConfig().policy_id()
    assert any("SaLoRA-style (post-hoc)" in n for n in outcome.report.notes)


def test_rank_option_uses_top_directions(sf_bank, tiny_adapter_random):
    adapter = read_adapter(tiny_adapter_random)
    outcome = project_adapter(adapter, sf_bank, SaLoRAConfig(rank=2))
    tensors = st_load(outcome.adapter.weights_bytes)
    for name, m in adapter.modules.items():
        Vs = sf_bank.safety_features[name][:, :2].double()
        B = m.lora_B.double()
        assert torch.allclose(tensors[m.b_key].double(), B - Vs @ (Vs.T @ B), atol=1e-5 * float(B.abs().max()))


def test_orthogonal_update_is_left_byte_identical(sf_bank, tiny_adapter_random, tmp_path):
    adapter = read_adapter(tiny_adapter_random)
    once = project_adapter(adapter, sf_bank, SaLoRAConfig())
    out = write_projected(once, tmp_path / "once")
    twice = project_adapter(read_adapter(out), sf_bank, SaLoRAConfig())
    # B' is already orthogonal to V_s (to float32 round-off): nothing left to remove
    assert all(r.salora_removed_fraction < 1e-5 for r in twice.report.modules)
    assert twice.report.summary.outcome == "unchanged"


def test_bank_without_features_is_a_clear_bank_error(tiny_bank, tiny_adapter_random):
    adapter = read_adapter(tiny_adapter_random)
    with pytest.raises(BankError, match="safety features"):
        project_adapter(adapter, tiny_bank, SaLoRAConfig())
    with pytest.raises(BankError, match="--safety-prompts"):
        make_policy(SaLoRAConfig()).validate_bank(tiny_bank)
    with pytest.raises(BankError):
        make_policy(ChainConfig(steps=[SafeLoRAConfig(), SaLoRAConfig()])).validate_bank(tiny_bank)
    make_policy(SafeLoRAConfig()).validate_bank(tiny_bank)  # Safe LoRA needs none
    assert tiny_bank.features_id is None


def test_policy_id_follows_the_features(sf_bank, sf_bank_dir, tiny_bank_dir, prompts, tmp_path):
    other = load_bank(features_bank(tiny_bank_dir, tmp_path / "bank4", prompts, 4), "cpu")
    assert other.bank_id == sf_bank.bank_id  # bank.safetensors unchanged
    assert other.features_id != sf_bank.features_id
    policy = SaLoRAConfig()
    assert policy.policy_id(other) != policy.policy_id(sf_bank)
    assert SaLoRAConfig(rank=2).policy_id(sf_bank) != policy.policy_id(sf_bank)
    # policies that do not read V_s keep their id
    assert SafeLoRAConfig().policy_id(sf_bank) == SafeLoRAConfig().policy_id()
    chain = parse_policy({"kind": "chain", "steps": [{"kind": "safelora"}, {"kind": "salora-style"}]})
    assert chain.policy_id(other) != chain.policy_id(sf_bank)


def test_features_are_verified_on_load(sf_bank_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sf_bank_dir, bad)
    path = bad / read_manifest(bad).safety_features.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BankError, match="safety features"):
        load_bank(bad, "cpu")
    path.unlink()
    with pytest.raises(BankError, match="missing"):
        load_bank(bad, "cpu")


def test_replacing_features_keeps_bank_and_old_readers(sf_bank_dir, prompts, tmp_path):
    from vllm_safelora.bank import BankManifest, add_safety_features
    from vllm_safelora.bank.safety_features import SafetyFeatureSpec

    copy = tmp_path / "copy"
    shutil.copytree(sf_bank_dir, copy)
    before = read_manifest(copy)
    after = add_safety_features(copy, SafetyFeatureSpec(prompts=prompts, rank=3), show_progress=False)
    assert after.bank_id == before.bank_id and after.safety_features.rank == 3
    assert sorted(p.name for p in copy.glob("*safety_features*")) == [after.safety_features.file]
    assert load_bank(copy).features_id == after.safety_features.features_id
    # a manifest without the section still parses (banks built before it)
    raw = json.loads((copy / "manifest.json").read_text())
    raw.pop("safety_features")
    assert BankManifest.model_validate(raw).safety_features is None


def test_prompt_file_validation(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "no"}\nnot json\n{"prompt": "", "response": "r"}\n[1]\n')
    with pytest.raises(BankError) as exc:
        read_safety_prompts(bad)
    assert "line 2" in str(exc.value) and "line 3" in str(exc.value) and "line 4" in str(exc.value)


def test_shipped_prompt_file():
    samples, _ = read_safety_prompts(REPO / "configs" / "safety_prompts.jsonl")
    assert 64 <= len(samples) <= 128
    assert len({s["prompt"] for s in samples}) == len(samples)


def test_cli_build_bank_with_safety_prompts(tiny_models, prompts, tmp_path, capsys):
    from vllm_safelora.cli import main

    out = tmp_path / "bank"
    rc = main(
        [
            "build-bank",
            "--base",
            str(tiny_models.base),
            "--aligned",
            str(tiny_models.aligned),
            "--out",
            str(out),
            "--modules",
            "q_proj,v_proj",
            "--safety-prompts",
            str(prompts),
            "--safety-rank",
            "4",
        ]
    )
    assert rc == 0
    section = read_manifest(out).safety_features
    assert section.rank == 4 and {m.name for m in section.modules} == {m.name for m in read_manifest(out).modules}
    assert "safety features sf-" in capsys.readouterr().out
    rc = main(
        ["build-bank", "--out", str(out), "--features-only", "--safety-prompts", str(prompts), "--safety-rank", "2"]
    )
    assert rc == 0 and read_manifest(out).safety_features.rank == 2
    assert main(["build-bank", "--out", str(out), "--aligned", str(tiny_models.aligned)]) == 2  # no --base
