"""The names an adapter is made of: its two file names, and its tensor names as vLLM parses them.

This module imports no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

_PEFT_PREFIX = "base_model.model."

NameParser = Callable[[str], "tuple[str, bool]"]
"""vLLM's tensor-name parser: name -> (module, is_lora_a); raises ValueError where vLLM does."""


def parse_lora_name(name: str) -> tuple[str, bool]:
    """vLLM 0.32's ``vllm.lora.utils.parse_fine_tuned_lora_name`` without a weights mapper, line for line.

    Kept vLLM-free so the reader works offline; at serve time the integration hands
    the reader vLLM's own function (``ReadLimits.parse_name``), and tests prove the two
    equal on hostile names. vLLM's quirks are kept on purpose, since they decide which
    module a tensor lands on: *every* ``base_model.model.`` is removed (not only the
    prefix), a name that still starts with it afterwards loses two more parts,
    ``*.score.weight`` / ``*.classifier.bias`` name full modules, and embedding
    tensors have no ``.weight`` suffix.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name.replace(_PEFT_PREFIX, "")
    start_index = 2 if name.startswith(_PEFT_PREFIX) else 0
    parts = name.split(".")
    if (parts[-1] == "weight" or parts[-1] == "bias") and len(parts) >= 2:
        if parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            return ".".join(parts[start_index:-2]), parts[-2] == "lora_A"
        if parts[-2] in ("score", "classifier"):
            return parts[-2], False
    if parts[-1] == "lora_embedding_A" or parts[-1] == "lora_embedding_B":
        return ".".join(parts[start_index:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def canonical_name(module: str, which: str) -> str:
    """The one name the writer uses for a module's lora_A / lora_B (PEFT's own layout)."""
    return f"{_PEFT_PREFIX}{module}.lora_{which}.weight"


def is_canonical_name(name: str) -> bool:
    try:
        module, is_a = parse_lora_name(name)
    except ValueError:
        return False
    return bool(module) and name == canonical_name(module, "A" if is_a else "B")
