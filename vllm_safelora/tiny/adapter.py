"""Tiny PEFT LoRA adapters, random or aimed along / against the alignment delta, and the
dense reference Safe LoRA cosine that tells them apart."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from .models import alignment_deltas, save_safetensors


def safelora_cosine(v: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """Dense reference Safe LoRA cosine: C = V V^T/||V||_F, cos(vec(C B A), vec(B A)), float64."""
    v, b, a = v.double(), lora_b.double(), lora_a.double()
    c = v @ v.T / torch.linalg.norm(v)
    dw = b @ a
    cdw = c @ dw
    return float((cdw * dw).sum() / (torch.linalg.norm(cdw) * torch.linalg.norm(dw)))


_DIRECTIONS = ("random", "aligned", "orthogonal")


def _peft_to_hf_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'."""
    prefix = "base_model.model."
    return peft_name[len(prefix) :] if peft_name.startswith(prefix) else peft_name


def save_peft_adapter(peft_model, out_dir: Path, base_model: Path) -> Path:
    """``peft_model.save_pretrained`` into a fresh ``out_dir``, naming ``base_model`` as its base (a local path)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_model)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def make_tiny_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    direction: str = "random",
    base_dir: Path | None = None,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    scale: float = 1.0,
    top_k: int | None = None,
) -> Path:
    """Write a real PEFT LoRA adapter for ``model_dir`` into ``out_dir`` and return out_dir.

    direction:
      * "random": Gaussian lora_A and lora_B.
      * "aligned": lora_B columns in the span of the top ``top_k`` left singular vectors of
        V = W(model_dir) - W(base_dir), weighted toward the first (Safe LoRA cosine high).
      * "orthogonal": lora_B columns orthogonal to those vectors (Safe LoRA cosine low).
    ``top_k`` defaults to the ``delta_rank`` recorded by :func:`make_tiny_models` (else 4).
    Every module's update is scaled so that ||s * B A||_F = scale * ||W||_F.
    lora_A is Gaussian in every direction mode. Saved with safetensors, then cast to dtype.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported adapter dtype {dtype}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    deltas: dict[str, torch.Tensor] = {}
    if direction != "random":
        if base_dir is None:
            raise ValueError(f"direction={direction!r} needs base_dir (delta = model_dir - base_dir)")
        deltas = alignment_deltas(model_dir, Path(base_dir))
        if top_k is None:
            meta = model_dir / "tiny_model.json"
            top_k = json.loads(meta.read_text()).get("delta_rank", 4) if meta.exists() else 4

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lcfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        init_lora_weights=False,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lcfg)

    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, mod in sorted(peft_model.named_modules(), key=lambda kv: kv[0]):
            if not (hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})):
                continue
            a_w = mod.lora_A["default"].weight  # r x d_in
            b_w = mod.lora_B["default"].weight  # d_out x r
            r, d_in = a_w.shape
            d_out = b_w.shape[0]
            s = float(mod.scaling["default"])
            w = mod.get_base_layer().weight.double()
            a = torch.randn(r, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
            if direction == "random":
                b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
            else:
                v = deltas[_peft_to_hf_name(name)].double()
                u, _, _ = torch.linalg.svd(v, full_matrices=False)
                k = min(top_k, d_out)
                if direction == "aligned":
                    wts = 2.0 ** (-torch.arange(k, dtype=torch.float64))
                    coef = torch.randn(k, r, generator=g, dtype=torch.float64) * wts[:, None]
                    b = u[:, :k] @ coef
                else:  # orthogonal: random vector, top-k left singular directions removed
                    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
                    top = u[:, :k]
                    b = b - top @ (top.T @ b)
                    b = b - top @ (top.T @ b)  # second pass: orthogonal to rounding
            # ||s B A||_F = scale * ||W||_F
            norm = torch.linalg.norm(s * (b @ a))
            target = scale * torch.linalg.norm(w)
            f = torch.sqrt(target / norm) if norm > 0 else torch.tensor(1.0, dtype=torch.float64)
            a_w.copy_((a * f).float())
            b_w.copy_((b * f).float())

    save_peft_adapter(peft_model, out_dir, model_dir)
    st = out_dir / "adapter_model.safetensors"
    tensors = load_file(str(st))
    if dtype != torch.float32:
        tensors = {k: t.to(dtype) for k, t in tensors.items()}
    save_safetensors(tensors, st)  # rewrite always: deterministic bytes + metadata
    readme = out_dir / "README.md"
    if readme.exists():  # peft's model card: not needed, and not deterministic across versions
        readme.unlink()
    return out_dir
