"""Chains: steps in order, each on the previous result; equal to applying the steps by hand."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load as st_load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from policy_helpers import features_bank, mixed_adapter, write_prompts  # noqa: E402

from vllm_safelora.adapters import read_adapter  # noqa: E402
from vllm_safelora.bank import load_bank  # noqa: E402
from vllm_safelora.apply_policy import project_adapter, write_projected  # noqa: E402
from vllm_safelora.policies import (  # noqa: E402
    ChainConfig,
    SafeLoRAConfig,
    SaLoRAConfig,
    SPLoRAConfig,
    parse_policy,
)

ODD = "model.layers.1.self_attn.v_proj"
SAFE = SafeLoRAConfig(select="topk", topk=3)
PRUNE = SPLoRAConfig(select="topk", topk=2)


@pytest.fixture(scope="module")
def mixed(tiny_adapter_factory, tmp_path_factory):
    return mixed_adapter(tiny_adapter_factory, tmp_path_factory.mktemp("chain") / "mixed", odd_module=ODD)


@pytest.fixture(scope="module")
def sf_bank(tiny_bank_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain_sf")
    return load_bank(features_bank(tiny_bank_dir, tmp / "bank", write_prompts(tmp / "p.jsonl"), 4), "cpu")


def by_hand(adapter_dir, bank, steps, tmp_path):
    """Each step through the engine, written to disk and read back, as a user would."""
    current = adapter_dir
    for i, step in enumerate(steps):
        outcome = project_adapter(read_adapter(current), bank, step)
        current = write_projected(outcome, tmp_path / f"step{i}")
    return st_load((current / "adapter_model.safetensors").read_bytes()), current


@pytest.mark.parametrize(
    "steps",
    [
        (SAFE, PRUNE),
        (PRUNE, SAFE),
        (SaLoRAConfig(), PRUNE),
        (PRUNE, SaLoRAConfig(), SafeLoRAConfig(select="all")),
    ],
    ids=["safelora-splora", "splora-safelora", "salora-splora", "splora-salora-safelora"],
)
def test_chain_equals_steps_by_hand(mixed, sf_bank, steps, tmp_path):
    adapter = read_adapter(mixed)
    outcome = project_adapter(adapter, sf_bank, ChainConfig(steps=steps))
    got = st_load(outcome.adapter.weights_bytes)
    want, last_dir = by_hand(mixed, sf_bank, steps, tmp_path)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the config (exclude_modules for pruned modules) is the same as by hand too
    assert json.loads(outcome.adapter.config_bytes) == json.loads((last_dir / "adapter_config.json").read_bytes())

    report = outcome.report
    assert report.summary.policy_name == "chain" and report.summary.modules == len(adapter.modules)
    assert sum(n.startswith(f"step {i + 1}/{len(steps)} ") for i in range(len(steps)) for n in report.notes) == len(
        steps
    )
    pruned = {r.module for r in report.modules if r.pruned}
    assert pruned == set(adapter.modules) - set(read_adapter(last_dir).modules)
    assert report.summary.pruned == len(pruned) == 2
    for r in report.modules:
        assert r.pruned == any(a.endswith(":prune") for a in r.actions)
        assert r.projected == any(a.endswith(":project") for a in r.actions)


def test_order_matters(mixed, tiny_bank):
    adapter = read_adapter(mixed)
    a = project_adapter(adapter, tiny_bank, ChainConfig(steps=(SAFE, PRUNE)))
    b = project_adapter(adapter, tiny_bank, ChainConfig(steps=(PRUNE, SAFE)))
    ta, tb = st_load(a.adapter.weights_bytes), st_load(b.adapter.weights_bytes)
    assert set(ta) != set(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta)
    assert a.report.summary.policy_id != b.report.summary.policy_id
    # prune first: the odd module goes before Safe LoRA's top-k sees it
    first = {r.module: r for r in b.report.modules}
    assert first[ODD].pruned and first[ODD].actions == ["splora:prune"]


def test_single_step_chain_equals_the_policy(mixed, tiny_bank):
    adapter = read_adapter(mixed)
    alone = project_adapter(adapter, tiny_bank, SAFE)
    chained = project_adapter(adapter, tiny_bank, ChainConfig(steps=(SAFE,)))
    assert chained.adapter.weights_bytes == alone.adapter.weights_bytes
    for x, y in zip(alone.report.modules, chained.report.modules):
        assert (x.module, x.cosine, x.projected, x.pdst_term) == (
            y.module,
            y.cosine,
            y.projected,
            pytest.approx(y.pdst_term),
        )


def test_merged_report_keeps_upload_scores(mixed, tiny_bank):
    adapter = read_adapter(mixed)
    safe = project_adapter(adapter, tiny_bank, SAFE)
    chained = project_adapter(adapter, tiny_bank, ChainConfig(steps=(SAFE, PRUNE)))
    for x, y in zip(safe.report.modules, chained.report.modules):
        assert (x.cosine, x.relative_distance, x.update_norm) == (y.cosine, y.relative_distance, y.update_norm)
        assert y.distance_score is not None
        if y.projected and not y.pruned:
            assert y.pdst_term == pytest.approx(1.0)  # served lora_B is C lora_B of the upload
    assert chained.report.summary.min_cosine == safe.report.summary.min_cosine
    s = chained.report.summary
    assert 0 < s.lora_flops_saved_fraction < 1 and s.lora_flops_per_token_after < s.lora_flops_per_token
    assert "pruned" in chained.report.table()


def test_policy_ids_and_parsing():
    a = parse_policy({"kind": "chain", "steps": [{"kind": "safelora"}, {"kind": "splora"}]})
    b = parse_policy({"kind": "chain", "steps": [{"kind": "splora"}, {"kind": "safelora"}]})
    c = parse_policy({"kind": "chain", "steps": [{"kind": "safelora", "threshold": 0.4}, {"kind": "splora"}]})
    assert isinstance(a, ChainConfig) and a.steps == (SafeLoRAConfig(), SPLoRAConfig())
    assert len({a.policy_id(), b.policy_id(), c.policy_id(), SafeLoRAConfig().policy_id()}) == 4
    assert not a.uses_safety_features()
    assert parse_policy({"kind": "chain", "steps": [{"kind": "salora-style"}]}).uses_safety_features()
    with pytest.raises(ValueError):
        parse_policy({"kind": "chain", "steps": []})
    with pytest.raises(ValueError):
        parse_policy({"kind": "chain", "steps": [{"kind": "chain", "steps": [{"kind": "safelora"}]}]})
    with pytest.raises(ValueError):
        parse_policy({"kind": "nope"})


def test_cli_policy_file(mixed, tiny_bank_dir, tmp_path, capsys):
    from vllm_safelora.cli import main

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "kind: chain\nsteps:\n  - {kind: safelora, select: topk, topk: 3}\n  - {kind: splora, select: topk, topk: 2}\n"
    )
    assert main(["inspect", str(mixed), "--bank", str(tiny_bank_dir), "--policy-file", str(policy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["policy_name"] == "chain" and report["summary"]["pruned"] == 2
    assert (
        main(
            [
                "project",
                str(mixed),
                "--bank",
                str(tiny_bank_dir),
                "--policy-file",
                str(policy),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 pruned" in out and "saved" in out
    assert len(read_adapter(tmp_path / "out").modules) == len(read_adapter(mixed).modules) - 2
    # a plugin-style config with a top-level policy key works; flags and a file together do not
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text("bank: /x\npolicy: {kind: splora, threshold: 1.5}\n")
    assert main(["inspect", str(mixed), "--bank", str(tiny_bank_dir), "--policy-file", str(plugin)]) == 0
    assert "z" in capsys.readouterr().out
    assert (
        main(["inspect", str(mixed), "--bank", str(tiny_bank_dir), "--policy-file", str(policy), "--threshold", "0.3"])
        == 2
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: splora\nthreshhold: 2\n")
    assert main(["inspect", str(mixed), "--bank", str(tiny_bank_dir), "--policy-file", str(bad)]) == 2
    assert "threshhold" in capsys.readouterr().err
