"""The tiny Llama's shape: its config, vocabulary size and the linear modules adapters target."""

from __future__ import annotations

TINY_VOCAB_SIZE = 512

TINY_LLAMA_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,  # vLLM's CPU attention rejects head_dim 16; 64 works
    "max_position_embeddings": 512,
    "vocab_size": TINY_VOCAB_SIZE,  # overwritten with len(tokenizer) when models are made
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES


def linear_module_kind(name: str) -> str | None:
    """``q_proj`` ... ``down_proj`` for a linear weight's state-dict name, else None."""
    for m in LINEAR_MODULES:
        if name.endswith(f".{m}.weight"):
            return m
    return None
