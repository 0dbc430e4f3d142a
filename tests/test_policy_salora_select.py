"""Selective SaLoRA-style projection: choose modules by safety-feature overlap (or cosine), project only those.

Checked against a dense, plain reference: dW = s B A materialised, overlap ||V_s V_s^T dW|| / ||dW||,
the k largest chosen by sorting, B' = B - V_s V_s^T B on exactly those modules, everything else byte-identical.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from safetensors.torch import load as st_load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from policy_helpers import ATTN, features_bank, write_prompts  # noqa: E402

from dense_reference import approx_operator  # noqa: E402
from vllm_safelora.adapters import read_adapter  # noqa: E402
from vllm_safelora.bank import load_bank  # noqa: E402
from vllm_safelora.apply_policy import project_adapter  # noqa: E402
from vllm_safelora.errors import BankError  # noqa: E402
from vllm_safelora.policies import ChainConfig, SaLoRASelectConfig, make_policy, parse_policy  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def sf_bank(tiny_bank_dir, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("select_prompts") / "safety.jsonl")
    return load_bank(features_bank(tiny_bank_dir, tmp_path_factory.mktemp("select") / "bank", prompts, RANK), "cpu")


@pytest.fixture(scope="module")
def adapter(tiny_adapter_factory):
    return read_adapter(tiny_adapter_factory("random", target_modules=ATTN))


def dense_overlaps(adapter, bank, r):
    out = {}
    for name, m in adapter.modules.items():
        Vs = bank.safety_features[name][:, :r].double()
        dW = m.scale * m.lora_B.double() @ m.lora_A.double()
        out[name] = float(torch.linalg.norm(Vs @ (Vs.T @ dW)) / torch.linalg.norm(dW))
    return out


def dense_cosines(adapter, deltas):
    out = {}
    for name, m in adapter.modules.items():
        dW = m.lora_B.double() @ m.lora_A.double()
        CdW = approx_operator(deltas[name]) @ dW
        out[name] = float(torch.sum(CdW * dW) / (torch.linalg.norm(CdW) * torch.linalg.norm(dW)))
    return out


def check_projected(adapter, bank, outcome, chosen, r):
    tensors = st_load(outcome.adapter.weights_bytes)
    for name, m in adapter.modules.items():
        B = m.lora_B.double()
        if name in chosen:
            Vs = bank.safety_features[name][:, :r].double()
            assert torch.allclose(tensors[m.b_key].double(), B - Vs @ (Vs.T @ B), atol=1e-5 * float(B.abs().max()))
        else:
            assert torch.equal(tensors[m.b_key], m.lora_B)
        assert torch.equal(tensors[m.a_key], m.lora_A)


@pytest.mark.parametrize("k", [1, 3])
def test_topk_by_overlap_matches_dense(sf_bank, adapter, k):
    ov = dense_overlaps(adapter, sf_bank, 4)
    chosen = set(sorted(ov, key=lambda n: -ov[n])[:k])
    outcome = project_adapter(adapter, sf_bank, SaLoRASelectConfig(rank=4, topk=k))
    by = {r.module: r for r in outcome.report.modules}
    assert {n for n, r in by.items() if r.projected} == chosen
    for n, r in by.items():
        assert r.salora_removed_fraction == pytest.approx(ov[n], rel=1e-6)
    check_projected(adapter, sf_bank, outcome, chosen, 4)


def test_threshold_and_all(sf_bank, adapter):
    ov = dense_overlaps(adapter, sf_bank, RANK)
    vals = sorted(ov.values())
    t = (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2  # between two modules: no round-off ties
    outcome = project_adapter(adapter, sf_bank, SaLoRASelectConfig(select="threshold", threshold=t))
    chosen = {n for n, v in ov.items() if v >= t}
    check_projected(adapter, sf_bank, outcome, chosen, RANK)
    # select: all equals SaLoRA-style on every module
    check_projected(
        adapter, sf_bank, project_adapter(adapter, sf_bank, SaLoRASelectConfig(select="all")), set(ov), RANK
    )


def test_cosine_score_picks_safe_loras_modules(sf_bank, adapter, tiny_deltas):
    cos = dense_cosines(adapter, tiny_deltas)
    chosen = set(sorted(cos, key=lambda n: cos[n])[:2])
    outcome = project_adapter(adapter, sf_bank, SaLoRASelectConfig(topk=2, score="cosine"))
    check_projected(adapter, sf_bank, outcome, chosen, RANK)
    vals = sorted(cos.values())
    t = (vals[1] + vals[2]) / 2
    outcome = project_adapter(adapter, sf_bank, SaLoRASelectConfig(select="threshold", threshold=t, score="cosine"))
    check_projected(adapter, sf_bank, outcome, {n for n, c in cos.items() if round(c, 5) <= round(t, 5)}, RANK)


def test_config_parses_chains_and_needs_features(tiny_bank, adapter):
    cfg = parse_policy({"kind": "salora-select", "rank": 8, "topk": 4})
    assert isinstance(cfg, SaLoRASelectConfig) and cfg.uses_safety_features()
    parse_policy(
        {"kind": "chain", "steps": [{"kind": "safelora", "threshold": 0.5}, {"kind": "salora-select", "topk": 2}]}
    )
    with pytest.raises(ValueError):
        SaLoRASelectConfig(select="topk")  # no k
    with pytest.raises(BankError, match="safety features"):
        make_policy(SaLoRASelectConfig(topk=1)).validate_bank(tiny_bank)
    with pytest.raises(BankError):
        make_policy(ChainConfig(steps=[SaLoRASelectConfig(topk=1)])).validate_bank(tiny_bank)


def test_topk_zero_changes_nothing(sf_bank, adapter):
    outcome = project_adapter(adapter, sf_bank, SaLoRASelectConfig(topk=0))
    assert outcome.report.summary.outcome == "unchanged"
