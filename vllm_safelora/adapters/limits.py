"""What a tenant can make the server read (:class:`ReadLimits`), and how the reader refuses.

This module imports no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Mapping

import torch

from .names import NameParser, parse_lora_name

# What the header of one tensor may cost: its name (module paths are < 150 characters),
# dtype, shape and offsets. __metadata__ gets a fixed allowance on top.
HEADER_BYTES_PER_TENSOR = 512
HEADER_METADATA_BYTES = 64 << 10

ConfigCheck = Callable[[Mapping[str, Any]], "list[str]"]
"""Extra adapter_config.json validation (vLLM's PEFTHelper at serve time): problems, or []."""
ModuleFilter = Callable[[str], bool]
"""Whether the served vLLM applies LoRA to a module (its --lora-target-modules)."""


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what a tenant can make the server read, and how the served vLLM reads it.

    The defaults are vLLM-free and generous (offline tools, tests); the server uses
    ``vllm_safelora.integration.vllm_rules.read_limits_for``, which derives every
    bound from the served model and hands in vLLM's own parser and config check.
    """

    max_bytes: int = 2 << 30
    """Size of adapter_model.safetensors (served: also bounded by the model's largest possible LoRA)."""
    max_rank: int | None = None
    """vLLM's --max-lora-rank: r, every rank_pattern value and every tensor's rank."""
    max_config_bytes: int = 1 << 20
    """Size of adapter_config.json (real ones are a few KB; rank/alpha patterns add ~100 B per key)."""
    max_config_depth: int = 16
    """JSON nesting of adapter_config.json (real ones nest 2-3 deep)."""
    max_tensors: int = 8192
    """Tensors in one adapter (served: 2 per LoRA module the model has, x 2 slack)."""
    max_header_bytes: int = 8192 * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES
    """Size of the safetensors JSON header, checked before it is parsed (served: from max_tensors)."""
    max_tensor_elements: int = 1 << 28
    """Elements of one tensor (served: max_rank x the model's widest projection x 4 for fused ones)."""
    max_lora_alpha: float = 4096.0
    """|lora_alpha| and every |alpha_pattern| value; keeps s = alpha / r (or / sqrt r) sane."""
    max_update_abs: float = 65536.0
    """Cap on max |s B A| in any dtype, so a finite update cannot blow up the next layer's norm."""
    serve_dtype: torch.dtype | None = None
    """dtype vLLM runs LoRA weights in (lora_dtype); None: each adapter's own dtype."""
    parse_name: NameParser = field(default=parse_lora_name)
    """How the served vLLM maps tensor names to modules (vLLM's parser with the model's weights mapper)."""
    module_served: ModuleFilter | None = None
    """vLLM's deployment filter (--lora-target-modules); None: every module."""
    check_config: ConfigCheck | None = None
    """The served vLLM's own adapter_config.json validation (PEFTHelper); None: only the reader's mirror of it."""
    rules: str = "reader-defaults"
    """Names the served vLLM's rules the callables above stand for (its version, model, flags): what an
    upload was validated against, so an upload known by identity is trusted only under the same rules."""

    def fingerprint(self) -> str:
        """The limits and rules an upload passed, as text (a key beside the upload's identity)."""
        return repr(
            (
                self.max_bytes,
                self.max_rank,
                self.max_config_bytes,
                self.max_config_depth,
                self.max_tensors,
                self.max_header_bytes,
                self.max_tensor_elements,
                self.max_lora_alpha,
                self.max_update_abs,
                str(self.serve_dtype),
                self.rules,
            )
        )
