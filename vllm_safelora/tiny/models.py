"""The tiny ``base`` and ``aligned`` checkpoints (aligned = base + an alignment delta), and reading them back.

The alignment delta of a module, V = W_aligned - W_base (d_out x d_in), is built from
its SVD, V = U diag(s) Q^T with random orthonormal U, Q and a decaying, full-rank spectrum:

    s_i = sigma * 2**-i                              for i <  delta_rank  (the "alignment" part)
    s_i = sigma * noise * 2**-(i - delta_rank) / 8   for i >= delta_rank  (a decaying tail)

where sigma = 0.25 * spectral norm scale of the module's weight. The tail, not
isotropic Gaussian noise, is deliberate: the Safe LoRA cosine is invariant to the scale
of C = V V^T / ||V||_F, so an update orthogonal to the top directions would see only the
noise part of C, and isotropic noise (a flat Marchenko-Pastur bulk) gives it a cosine of
about 0.7 whatever ``noise`` is. A decaying tail gives it a low cosine, as intended. The
tail decays into float32 rounding of the stored weights after a few dozen directions,
which then forms the (tiny, isotropic) floor of the spectrum.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .architecture import TINY_LLAMA_CONFIG, linear_module_kind
from .tokenizer import make_tiny_tokenizer, save_tokenizer


@dataclass(frozen=True)
class TinyModels:
    base: Path  # "pre-alignment" model directory
    aligned: Path  # "chat/aligned" model = base + alignment delta; the one that gets served


def _llama_config(vocab_size: int, tok):
    from transformers import LlamaConfig

    cfg = dict(TINY_LLAMA_CONFIG)
    cfg.pop("architectures")
    cfg.pop("model_type")
    cfg.pop("torch_dtype")
    rope_theta = cfg.pop("rope_theta")
    cfg.update(
        vocab_size=vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlamaConfig(**cfg)
    try:  # transformers >= 5 keeps rope settings in rope_parameters
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    except Exception:  # pragma: no cover - older transformers
        config.rope_theta = rope_theta
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    return config


def _orthonormal(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """n x k matrix with orthonormal columns, deterministic (float64 QR, signs fixed)."""
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d


def _base_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float32)
        elif linear_module_kind(name) is not None:
            # ~ kaiming-ish: keeps activations O(1) through the tiny stack
            std = 1.0 / math.sqrt(shape[1])
            t = torch.randn(shape, generator=g, dtype=torch.float32) * std
        else:  # embed_tokens, lm_head
            std = TINY_LLAMA_CONFIG["initializer_range"]
            t = torch.randn(shape, generator=g, dtype=torch.float32) * std
        sd[name] = t.contiguous()
    return sd


def _delta(g: torch.Generator, d_out: int, d_in: int, w_std: float, delta_rank: int, noise: float) -> torch.Tensor:
    m = min(d_out, d_in)
    u = _orthonormal(g, d_out, m)
    q = _orthonormal(g, d_in, m)
    sigma = 0.25 * w_std * (math.sqrt(d_out) + math.sqrt(d_in))  # ~ 1/4 of ||W||_2
    i = torch.arange(m, dtype=torch.float64)
    k = min(delta_rank, m)
    s = torch.where(i < k, sigma * 2.0 ** (-i), sigma * noise * 2.0 ** (-(i - k)) / 8.0)
    return (u * s) @ q.T


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: sd[k].contiguous() for k in sorted(sd)}, str(path), metadata={"format": "pt"})


def make_tiny_models(out_dir: Path, *, seed: int = 0, delta_rank: int = 4, noise: float = 1e-3) -> TinyModels:
    """Write ``out_dir/base`` and ``out_dir/aligned`` (HF Llama checkpoints, float32).

    Deterministic: the same arguments give byte-identical files.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    base_dir, aligned_dir = out_dir / "base", out_dir / "aligned"
    tok = make_tiny_tokenizer(seed=0)  # tokenizer is the same for every seed
    config = _llama_config(len(tok), tok)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    base = _base_state_dict(shapes, seed)

    g = torch.Generator().manual_seed(seed + 1_000_003)
    aligned = {}
    for name in sorted(base):
        w = base[name]
        if linear_module_kind(name) is None:
            aligned[name] = w
            continue
        d_out, d_in = w.shape
        v = _delta(g, d_out, d_in, 1.0 / math.sqrt(d_in), delta_rank, noise)
        aligned[name] = (w.double() + v).float().contiguous()

    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    meta = {"seed": seed, "delta_rank": delta_rank, "noise": noise, "generator": "vllm_safelora.tiny"}
    for d, sd, role in ((base_dir, base, "base"), (aligned_dir, aligned, "aligned")):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        config.save_pretrained(str(d))
        gen.save_pretrained(str(d))
        save_tokenizer(tok, d)
        save_safetensors(sd, d / "model.safetensors")
        (d / "tiny_model.json").write_text(json.dumps({**meta, "role": role}, indent=2, sort_keys=True) + "\n")
    return TinyModels(base=base_dir, aligned=aligned_dir)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def alignment_deltas(aligned_dir: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """{'model.layers.N.self_attn.q_proj': V (float32)} for every linear module."""
    a, b = load_state_dict(aligned_dir), load_state_dict(base_dir)
    return {k[: -len(".weight")]: (a[k].float() - b[k].float()) for k in sorted(a) if linear_module_kind(k) is not None}
