"""SPLoRA-style distance-guided pruning, checked against a dense reference; pruned adapters load in PEFT."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load as st_load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from policy_helpers import ATTN, PREFIX, dense_distance, dense_z, mixed_adapter  # noqa: E402

from vllm_safelora.adapters import CONFIG_FILE, read_adapter  # noqa: E402
from vllm_safelora.apply_policy import project_adapter, write_projected  # noqa: E402
from vllm_safelora.policies import SafeLoRAConfig, SPLoRAConfig, make_policy, parse_policy  # noqa: E402
from vllm_safelora.projection import ProjectionKind  # noqa: E402
from vllm_safelora.policies.splora import robust_scale, select_prune, standardised_distances  # noqa: E402

ODD = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def mixed(tiny_adapter_factory, tmp_path_factory):
    return mixed_adapter(tiny_adapter_factory, tmp_path_factory.mktemp("splora") / "mixed", odd_module=ODD)


def dense_scores(adapter, deltas):
    d = {n: dense_distance(deltas[n], m.lora_A, m.lora_B, m.scale) for n, m in adapter.modules.items()}
    return d, dense_z(d)


def flops(adapter, names):
    return sum(2 * m.rank * (m.d_in + m.d_out) for n, m in adapter.modules.items() if n in names)


def test_scores_and_threshold_selection_match_dense(mixed, tiny_bank, tiny_deltas):
    adapter = read_adapter(mixed)
    d, z = dense_scores(adapter, tiny_deltas)
    outcome = project_adapter(adapter, tiny_bank, SPLoRAConfig())
    by = {r.module: r for r in outcome.report.modules}
    for name in adapter.modules:
        assert by[name].relative_distance == pytest.approx(d[name], rel=1e-6, abs=1e-9)
        assert by[name].distance_score == pytest.approx(z[name], rel=1e-5, abs=1e-6)
    expected = {n for n, v in z.items() if v > 1.5}
    assert expected == {ODD}  # the one update far from alignment stands out
    assert {n for n, r in by.items() if r.pruned} == expected
    s = outcome.report.summary
    assert s.outcome == "modified" and s.pruned == 1 and s.projected == 0
    assert s.lora_flops_per_token == flops(adapter, adapter.modules)
    assert s.lora_flops_per_token_after == flops(adapter, set(adapter.modules) - expected)
    assert s.lora_flops_saved_fraction == pytest.approx(1 - s.lora_flops_per_token_after / s.lora_flops_per_token)


def test_pruning_removes_tensors_and_written_adapter_loads_in_peft(mixed, tiny_bank, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = read_adapter(mixed)
    outcome = project_adapter(adapter, tiny_bank, SPLoRAConfig())
    out = write_projected(outcome, tmp_path / "pruned")
    tensors = st_load((out / "adapter_model.safetensors").read_bytes())
    odd = adapter.modules[ODD]
    assert odd.a_key not in tensors and odd.b_key not in tensors
    assert set(tensors) == set(adapter.tensors) - {odd.a_key, odd.b_key}
    for k, t in tensors.items():
        assert torch.equal(t, adapter.tensors[k])  # survivors untouched
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["exclude_modules"] == [ODD]
    again = read_adapter(out)
    assert set(again.modules) == set(adapter.modules) - {ODD}

    # PEFT: the pruned adapter behaves as the original with the odd module's update removed.
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models.aligned), dtype=torch.float32)
    pruned = PeftModel.from_pretrained(base, str(out)).eval()
    names = [n for n, _ in pruned.named_modules() if n.endswith(ODD) and hasattr(_, "lora_A")]
    assert names == []  # no LoRA layer at all on the pruned module
    with torch.no_grad():
        got = pruned(input_ids=ids).logits

    base2 = AutoModelForCausalLM.from_pretrained(str(tiny_models.aligned), dtype=torch.float32)
    full = PeftModel.from_pretrained(base2, str(mixed)).eval()
    with torch.no_grad():
        full.get_submodule(f"{PREFIX}{ODD}").lora_B["default"].weight.zero_()
        want = full(input_ids=ids).logits
        unpruned = full.get_submodule(f"{PREFIX}{ODD}")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert unpruned is not None


def test_topk_prunes_exactly_k_largest(mixed, tiny_bank, tiny_deltas):
    adapter = read_adapter(mixed)
    _, z = dense_scores(adapter, tiny_deltas)
    outcome = project_adapter(adapter, tiny_bank, SPLoRAConfig(select="topk", topk=3))
    pruned = {r.module for r in outcome.report.modules if r.pruned}
    assert pruned == set(sorted(z, key=lambda n: -z[n])[:3])
    assert ODD in pruned


def test_all_pruned_guard_keeps_closest_unless_allowed(mixed, tiny_bank, tiny_deltas):
    adapter = read_adapter(mixed)
    _, z = dense_scores(adapter, tiny_deltas)
    n = len(adapter.modules)
    guarded = project_adapter(adapter, tiny_bank, SPLoRAConfig(select="topk", topk=n))
    kept = [r.module for r in guarded.report.modules if not r.pruned]
    assert kept == [min(z, key=z.get)]
    assert any("allow_empty" in note for note in guarded.report.notes)
    assert guarded.report.summary.pruned == n - 1

    empty = project_adapter(adapter, tiny_bank, SPLoRAConfig(select="topk", topk=n, allow_empty=True))
    assert empty.report.summary.pruned == n
    assert st_load(empty.adapter.weights_bytes) == {}
    assert empty.report.summary.lora_flops_saved_fraction == 1.0


def test_nothing_pruned_is_byte_identical(tiny_adapter_aligned, tiny_bank):
    adapter = read_adapter(tiny_adapter_aligned)
    outcome = project_adapter(adapter, tiny_bank, SPLoRAConfig(threshold=1e9))
    s = outcome.report.summary
    assert s.outcome == "unchanged" and s.pruned == 0 and s.lora_flops_saved_fraction == 0.0
    assert outcome.adapter.weights_bytes == adapter.weights_bytes
    assert outcome.adapter.config_bytes == adapter.config_bytes


def test_robust_scale_fallbacks():
    import numpy

    # IQR when the middle half is spread
    median, scale, which = robust_scale([0.1, 0.2, 0.3, 0.4, 0.9])
    assert (median, which) == (pytest.approx(0.3), "iqr") and scale == pytest.approx(0.2)
    # the middle half ties (IQR = 0, and so MAD = 0): 1.349 * population std, and the outlier stands out
    values = [0.2] * 7 + [0.3, 5.0]
    assert numpy.percentile(values, 75) - numpy.percentile(values, 25) == 0.0
    median, scale, which = robust_scale(values)
    assert which == "1.349*std" and median == pytest.approx(0.2)
    assert scale == pytest.approx(1.349 * numpy.std(values))
    z, *_ = standardised_distances({str(i): v for i, v in enumerate(values)})
    assert select_prune(z, "threshold", threshold=1.5, topk=0, allow_empty=False)[0] == {"8"}
    # all equal -> 1.0, every z = 0, nothing pruned
    z, median, scale, which = standardised_distances({"a": 0.7, "b": 0.7, "c": 0.7})
    assert which == "1.0" and set(z.values()) == {0.0}
    assert select_prune(z, "threshold", threshold=1.5, topk=0, allow_empty=False) == (set(), None)
    # a single module: z = 0
    z, *_ = standardised_distances({"only": 0.9})
    assert z == {"only": 0.0}
    # topk ties break by name, exactly k
    assert select_prune({"b": 1.0, "a": 1.0, "c": 0.0}, "topk", threshold=0, topk=1, allow_empty=False)[0] == {"a"}


def test_policy_ids_differ_across_settings():
    configs = [
        SPLoRAConfig(),
        SPLoRAConfig(threshold=1.0),
        SPLoRAConfig(select="topk", topk=2),
        SPLoRAConfig(select="topk", topk=3),
        SPLoRAConfig(projection="exact"),
        SPLoRAConfig(allow_empty=True),
        SafeLoRAConfig(),
    ]
    ids = {c.policy_id() for c in configs}
    assert len(ids) == len(configs)
    assert parse_policy({"kind": "splora", "threshold": 1.0}) == SPLoRAConfig(threshold=1.0)
    assert make_policy(SPLoRAConfig()).name == "splora"


def test_splora_on_exact_projection_uses_exact_C(tiny_adapter_factory, tiny_bank):
    adapter = read_adapter(tiny_adapter_factory("random", target_modules=ATTN))
    exact = project_adapter(adapter, tiny_bank, SPLoRAConfig(projection="exact"))
    for r in exact.report.modules:
        m = adapter.modules[r.module]
        sub = tiny_bank.get(r.module)
        U, w = sub.U.double(), sub.weights(ProjectionKind.EXACT).double()  # the bank's exact C_hat, dense
        C = U @ torch.diag(w) @ U.T
        dW = m.lora_B.double() @ m.lora_A.double()
        d = float(torch.linalg.norm(C @ dW - dW) / torch.linalg.norm(dW))
        assert r.relative_distance == pytest.approx(d, rel=1e-5, abs=1e-7)
