"""How the served vLLM will interpret an adapter: the limits the reader enforces for it.

The reader (``vllm_safelora.adapters``) imports no vLLM; this module turns the running
vLLM's configuration (max LoRA rank, the dtype LoRA weights run in, vLLM's own
name parser and PEFT config validation) into the ``ReadLimits`` the service reads with.
"""

from __future__ import annotations

from ..adapters import ReadLimits
from ..config import SafeLoRASettings


def read_limits_for(vllm_config, settings: SafeLoRASettings) -> ReadLimits:
    lora_config = vllm_config.lora_config
    return ReadLimits(max_bytes=settings.max_adapter_bytes, max_rank=lora_config.max_lora_rank)
