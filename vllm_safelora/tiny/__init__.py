"""Tiny, deterministic, local Llama-style models and PEFT LoRA adapters.

Used by the tests, the demo and the benchmarks. Nothing here touches the network or a
model hub: the tokenizer is trained on a small generated corpus, the weights are drawn
from seeded generators, and the adapters are made with ``peft`` itself.

* :func:`make_tiny_models` writes two HF checkpoints, ``base`` ("pre-alignment") and
  ``aligned`` (= base + an alignment delta in every q/k/v/o/gate/up/down projection).
  Only those linear weights differ; embeddings, norms and ``lm_head`` are identical.
* :func:`make_tiny_adapter` writes a PEFT LoRA adapter whose ``lora_B`` columns are
  random, inside the top singular subspace of the alignment delta ("aligned": high
  Safe LoRA cosine) or orthogonal to it ("orthogonal": low Safe LoRA cosine).

Same arguments -> byte-identical files (the tests check it).

One job per module:

* :mod:`.architecture`: the tiny Llama's config and the linear modules adapters target;
* :mod:`.tokenizer`: the byte-level BPE tokenizer and its chat template;
* :mod:`.models`: the ``base`` / ``aligned`` checkpoints, reading them back, their deltas;
* :mod:`.adapter`: the PEFT adapters, and the dense reference Safe LoRA cosine.
"""

from .adapter import make_tiny_adapter, safelora_cosine
from .architecture import LINEAR_MODULES, TINY_LLAMA_CONFIG
from .models import TinyModels, alignment_deltas, load_state_dict, make_tiny_models
from .tokenizer import TINY_CHAT_TEMPLATE, make_tiny_tokenizer, save_tokenizer

__all__ = [
    "TINY_LLAMA_CONFIG",
    "TINY_CHAT_TEMPLATE",
    "LINEAR_MODULES",
    "TinyModels",
    "make_tiny_tokenizer",
    "make_tiny_models",
    "make_tiny_adapter",
    "load_state_dict",
    "alignment_deltas",
    "safelora_cosine",
    "save_tokenizer",
]
