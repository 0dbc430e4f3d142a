"""Rows without a LoRA get no LoRA: a fix for vLLM 0.32's CPU LoRA kernels (torch ops).

vLLM marks a token that runs no adapter (a base-model request) with LoRA index -1. The
GPU kernels skip it; the CPU ops (``vllm/lora/ops/torch_ops/lora_ops.py``: ``bgmv_*``,
and ``sgmv_*`` through them) gather ``weights[indices]``, and Python's -1 is the LAST
slot. So whenever a base-model request shares a batch with LoRA requests, it is run
through whichever tenant's adapter sits in slot ``--max-loras - 1`` (measured on the
tiny Llama: base-model tokens change with an ordinary adapter there, and turn to
garbage with a huge one). That breaks tenant isolation regardless of what the reader
admits, so the plugin zeroes the inputs of those rows before each op: ``0 @ W`` adds
exactly nothing, given finite weights (the reader guarantees them for every adapter it
serves; empty slots are zeros). Rows with a LoRA are computed exactly as before.

Installed in every process (only the model runner calls these ops); idempotent.
"""

from __future__ import annotations

import functools
import threading

import torch

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_lock = threading.Lock()
_installed = False


def without_lora_rows(op):
    """``op(inputs, weights, output, lora_indices, ...)`` with the rows whose index is < 0 zeroed."""
    if getattr(op, "__safelora_masked__", False):
        return op

    @functools.wraps(op)
    def masked(
        inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, lora_indices: torch.Tensor, *args, **kwargs
    ):
        if lora_indices.numel() == inputs.shape[0]:
            no_lora = lora_indices < 0
            if bool(no_lora.any()):
                inputs = inputs.masked_fill(no_lora.view(-1, *([1] * (inputs.dim() - 1))), 0)
        return op(inputs, weights, output, lora_indices, *args, **kwargs)

    masked.__safelora_masked__ = True
    return masked


def install() -> None:
    """Wrap the CPU ops where they are looked up: the ops module (sgmv_* call bgmv_* there)
    and the CPU punica wrapper, which imported them by name."""
    global _installed
    with _lock:
        if _installed:
            return
        try:
            from vllm.lora.ops.torch_ops import lora_ops
            from vllm.lora.punica_wrapper import punica_cpu
        except ImportError:  # a build without the CPU LoRA path: nothing to fix
            _installed = True
            return

        for module in (lora_ops, punica_cpu):
            for name in _OPS:
                if hasattr(module, name):
                    setattr(module, name, without_lora_rows(getattr(module, name)))
        _installed = True
