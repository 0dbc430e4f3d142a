"""How the served vLLM will interpret an adapter: the limits the reader enforces for it.

The reader (``vllm_safelora.adapters``) imports no vLLM; this module turns the running
vLLM's configuration into the ``ReadLimits`` the service reads with:

* names: vLLM's own ``parse_fine_tuned_lora_name`` with the model's rename mapper
  (what ``WorkerLoRAManager._load_adapter`` passes it), and its --lora-target-modules
  filter, so the reader maps every tensor to the module vLLM will load it into;
* config: vLLM's own ``PEFTHelper.from_dict`` + ``validate_legal`` with the server's
  ``LoRAConfig``, so an adapter vLLM would refuse is refused here first, with its reason;
* numbers: the dtype vLLM runs LoRA weights in (``lora_config.lora_dtype``, resolved
  from the model dtype), for the update-overflow check;
* work: tensor count, header size, per-tensor elements and total bytes, derived from
  the served model's shape (layers, widest projection, experts) and --max-lora-rank.
"""

from __future__ import annotations

import functools
import logging
from typing import Any
from collections.abc import Mapping

from ..adapters import HEADER_BYTES_PER_TENSOR, HEADER_METADATA_BYTES, ReadLimits
from ..config import SafeLoRASettings

logger = logging.getLogger("vllm_safelora")

# LoRA-able linear modules per decoder layer of a dense model (q, k, v, o, gate, up, down),
# and per expert of a MoE layer (gate, up, down).
_LINEAR_PER_LAYER = 7
_LINEAR_PER_EXPERT = 3
# Fused checkpoint projections (qkv = 3 x hidden, gate_up = 2 x intermediate) are at most
# this many times the widest width the config names.
_FUSED_WIDTH = 4
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size", "n_inner")


def read_limits_for(vllm_config, settings: SafeLoRASettings) -> ReadLimits:
    lora_config = vllm_config.lora_config
    model_config = vllm_config.model_config
    max_rank = int(lora_config.max_lora_rank)
    modules, width = model_shape(model_config)
    max_tensors = 2 * modules * 2  # lora_A + lora_B per module, x 2 slack
    max_elements = max_rank * width * _FUSED_WIDTH
    max_header = max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES
    # A LoRA of every module at full rank, f32 (the widest dtype accepted): 2 tensors of
    # r x (widest) each per module, plus the header.
    max_bytes = min(settings.max_adapter_bytes, max_header + 8 + modules * 2 * max_elements * 4)
    mapper, target_filter = _name_rules(vllm_config)
    limits = ReadLimits(
        max_bytes=max_bytes,
        max_rank=max_rank,
        max_tensors=max_tensors,
        max_header_bytes=max_header,
        max_tensor_elements=max_elements,
        serve_dtype=lora_dtype(vllm_config),
        parse_name=functools.partial(_vllm_parse_name, weights_mapper=mapper),
        module_served=target_filter,
        check_config=functools.partial(
            peft_helper_problems,
            lora_config=lora_config,
            max_position_embeddings=getattr(model_config, "max_model_len", None),
        ),
        rules=_rules_named(vllm_config),
    )
    logger.info(
        "safelora: adapters are read as vLLM reads them (lora dtype %s, <= %d tensors, header <= %d B, "
        "<= %d elements per tensor, <= %d B)",
        limits.serve_dtype,
        max_tensors,
        max_header,
        max_elements,
        max_bytes,
    )
    return limits


def lora_dtype(vllm_config):
    """The dtype vLLM's worker casts LoRA weights to (``LoRAConfig.verify_with_model_config``)."""
    import torch

    dtype = vllm_config.lora_config.lora_dtype
    if dtype in (None, "auto"):
        dtype = vllm_config.model_config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def model_shape(model_config) -> tuple[int, int]:
    """(LoRA-able linear modules the model has, its widest projection width) from the HF config."""
    cfg = model_config.hf_text_config
    layers = int(model_config.get_total_num_hidden_layers())
    experts = max([int(getattr(cfg, k, 0) or 0) for k in _EXPERT_KEYS] + [0])
    per_layer = _LINEAR_PER_LAYER + _LINEAR_PER_EXPERT * experts
    widths = [int(getattr(cfg, k, 0) or 0) for k in _WIDTH_KEYS]
    widths.append(int(model_config.get_head_size()) * int(getattr(cfg, "num_attention_heads", 0) or 0))
    return layers * per_layer, max(widths)


def _name_rules(vllm_config):
    """The weights mapper vLLM parses LoRA names with, and its --lora-target-modules filter."""
    from vllm.lora.utils import is_in_target_modules
    from vllm.model_executor.model_loader import get_model_architecture

    model_cls, _ = get_model_architecture(vllm_config.model_config)
    mapper = getattr(model_cls, "hf_to_vllm_mapper", None)
    if mapper is not None:
        mapper = mapper.get_rename_mapper()  # as WorkerLoRAManager._load_adapter does
    targets = vllm_config.lora_config.target_modules
    if targets is None:
        return mapper, None
    packed = getattr(model_cls, "packed_modules_mapping", None)
    return mapper, functools.partial(_served, targets=list(targets), packed=packed, check=is_in_target_modules)


def _served(module: str, *, targets, packed, check) -> bool:
    return check(module, targets, packed)


def _vllm_parse_name(name: str, *, weights_mapper) -> tuple[str, bool]:
    from vllm.lora.utils import parse_fine_tuned_lora_name

    return parse_fine_tuned_lora_name(name, weights_mapper)


def peft_helper_problems(config: Mapping[str, Any], *, lora_config, max_position_embeddings: int | None) -> list[str]:
    """What vLLM's own PEFTHelper says about adapter_config.json on this server ([] if it accepts it).

    The worker runs exactly this (``PEFTHelper.from_local_dir`` then ``validate_legal``)
    before loading; running it here first means an adapter vLLM would refuse is never
    projected, cached or listed. from_dict raises TypeError/ValueError on odd types.
    """
    from vllm.lora.peft_helper import PEFTHelper

    try:
        helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": max_position_embeddings})
        helper.validate_legal(lora_config)
    except Exception as exc:  # anything vLLM raises here fails the load in the worker
        return [f"vLLM refuses it: {exc}"]
    return []


def _rules_named(vllm_config) -> str:
    """What the reader's vLLM callables depend on: the vLLM release, the model and the LoRA flags."""
    import vllm

    lora = vllm_config.lora_config
    return repr(
        (
            getattr(vllm, "__version__", "?"),
            str(vllm_config.model_config.model),
            getattr(vllm_config.model_config, "architecture", None),
            sorted(lora.target_modules or []),
            lora.max_lora_rank,
            str(lora_dtype(vllm_config)),
            getattr(vllm_config.model_config, "max_model_len", None),
        )
    )
