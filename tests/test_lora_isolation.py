"""vLLM 0.32's CPU LoRA ops gave rows without a LoRA (index -1) the LAST slot's adapter;
vllm_safelora.integration.lora_isolation makes them add exactly nothing."""

from __future__ import annotations

import pytest
import torch

from vllm_safelora.integration.lora_isolation import without_lora_rows


@pytest.fixture
def ops():
    from vllm.lora.ops.torch_ops import lora_ops

    return lora_ops


def stacked(slots: int, out: int, inp: int, last: float) -> torch.Tensor:
    w = torch.randn(slots, 1, out, inp, generator=torch.Generator().manual_seed(0))
    w[-1] = last  # the last slot: whoever loaded there (huge, to make any leak obvious)
    return w


def test_unpatched_ops_apply_the_last_slot_to_rows_without_lora(ops):
    x, w = torch.randn(3, 16), stacked(2, 8, 16, 1e4)
    y = torch.zeros(3, 8)
    ops.bgmv_shrink(x, w, y, torch.tensor([-1, 0, 1]), 1.0)
    assert y[0].abs().max() > 1e3  # the bug being fixed: row 0 asked for no LoRA


@pytest.mark.parametrize("name", ["bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"])
def test_rows_without_lora_get_nothing_and_the_others_are_unchanged(ops, name):
    op = getattr(ops, name)
    indices = torch.tensor([-1, 0, 1, -1, 1])
    x = torch.randn(5, 16)
    w = stacked(2, 8, 16, 1e4)
    y0 = torch.randn(5, 8)
    extra = {"bgmv_shrink": (0.5,), "bgmv_expand": (True,), "bgmv_expand_slice": (0, 8, True)}[name]
    want, got = y0.clone(), y0.clone()
    op(x, w, want, indices, *extra)
    without_lora_rows(op)(x, w, got, indices, *extra)
    lora = indices >= 0
    assert torch.equal(got[lora], want[lora])
    no_lora_expected = torch.zeros(2, 8) if name == "bgmv_shrink" else y0[~lora]
    assert torch.equal(got[~lora], no_lora_expected)


def test_sgmv_goes_through_the_masked_bgmv(ops, monkeypatch):
    monkeypatch.setattr(ops, "bgmv_expand", without_lora_rows(ops.bgmv_expand))
    x, w, y = torch.randn(4, 16), stacked(2, 8, 16, 1e4), torch.zeros(4, 8)
    # two sequences of two tokens: the first without LoRA, the second on slot 1
    ops.sgmv_expand(x, w, y, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([-1, 1]), 2, 2, 4, True)
    assert torch.equal(y[:2], torch.zeros(2, 8)) and y[2:].abs().max() > 1e3


def test_install_is_idempotent():
    from vllm.lora.punica_wrapper import punica_cpu

    from vllm_safelora.integration import lora_isolation

    lora_isolation.install()
    first = punica_cpu.bgmv_shrink
    lora_isolation._installed = False
    lora_isolation.install()
    assert punica_cpu.bgmv_shrink is first and getattr(first, "__safelora_masked__", False)
