"""vllm-safelora: Safe LoRA projection for every adapter vLLM serves."""

__version__ = "0.1.0"
