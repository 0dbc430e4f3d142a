"""Safety evidence for vllm-safelora: a CPU-sized Safe LoRA replication (``miniature``)."""
