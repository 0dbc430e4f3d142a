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

Same arguments -> byte-identical files (the tests check it).
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

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
]

# --------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------

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

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK, BOS, EOS, PAD = SPECIAL_TOKENS[:4]

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }}\n"
    "{% else %}<|assistant|> {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES

_WORDS = (
    "the a an this that my your our their some every no one two three many few "
    "cat dog bird fish model river city house tree stone cloud robot teacher student "
    "friend doctor garden window door road book letter song story question answer "
    "safety rule help request task plan idea reason problem result number word "
    "is are was were will can could should would may might must do does did "
    "run walk read write sing think know see find make take give tell ask answer "
    "explain help learn build open close start stop keep change move turn "
    "big small red blue green old new good bad happy sad quick slow bright dark "
    "safe careful honest kind simple clear long short warm cold "
    "and or but because so if when while then also very not always never often "
    "in on at to from with without about over under after before into "
    "i you he she it we they me him her us them what why how where who which "
    "hello please thanks sorry yes okay sure"
).split()


@dataclass(frozen=True)
class TinyModels:
    base: Path  # "pre-alignment" model directory
    aligned: Path  # "chat/aligned" model = base + alignment delta; the one that gets served


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def _corpus(seed: int, n: int = 1500) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(k)]
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ","])
        if rng.random() < 0.15:
            s += f" {rng.randint(0, 999)}"
        lines.append(s)
    return lines


def _build_tokenizer_object(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def make_tiny_tokenizer(out_dir: Path | None = None, *, seed: int = 0):
    """Build the tiny byte-level BPE tokenizer (with chat template); save it if out_dir."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer_object(seed),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    if out_dir is not None:
        _save_tokenizer(tok, Path(out_dir))
    return tok


def _save_tokenizer(tok, out_dir: Path) -> None:
    tok.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both
    # resolve "PreTrainedTokenizerFast" (5.x aliases it to the same backend).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


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


def _module_kind(name: str) -> str | None:
    for m in LINEAR_MODULES:
        if name.endswith(f".{m}.weight"):
            return m
    return None


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
        elif _module_kind(name) is not None:
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


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
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
        if _module_kind(name) is None:
            aligned[name] = w
            continue
        d_out, d_in = w.shape
        v = _delta(g, d_out, d_in, 1.0 / math.sqrt(d_in), delta_rank, noise)
        aligned[name] = (w.double() + v).float().contiguous()

    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    meta = {"seed": seed, "delta_rank": delta_rank, "noise": noise, "generator": "vllm_safelora.tiny"}
    for d, sd, role in ((base_dir, base, "base"), (aligned_dir, aligned, "aligned")):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        config.save_pretrained(str(d))
        gen.save_pretrained(str(d))
        _save_tokenizer(tok, d)
        _save_safetensors(sd, d / "model.safetensors")
        (d / "tiny_model.json").write_text(json.dumps({**meta, "role": role}, indent=2, sort_keys=True) + "\n")
    return TinyModels(base=base_dir, aligned=aligned_dir)


# --------------------------------------------------------------------------------------
# helpers shared with tests
# --------------------------------------------------------------------------------------


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def alignment_deltas(aligned_dir: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """{'model.layers.N.self_attn.q_proj': V (float32)} for every linear module."""
    a, b = load_state_dict(aligned_dir), load_state_dict(base_dir)
    return {
        k[: -len(".weight")]: (a[k].float() - b[k].float())
        for k in sorted(a)
        if _module_kind(k) is not None
    }


def safelora_cosine(v: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """Dense reference Safe LoRA cosine: C = V V^T/||V||_F, cos(vec(C B A), vec(B A)), float64."""
    v, b, a = v.double(), lora_b.double(), lora_a.double()
    c = v @ v.T / torch.linalg.norm(v)
    dw = b @ a
    cdw = c @ dw
    return float((cdw * dw).sum() / (torch.linalg.norm(cdw) * torch.linalg.norm(dw)))


# --------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------

_DIRECTIONS = ("random", "aligned", "orthogonal")


def _peft_to_hf_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'."""
    prefix = "base_model.model."
    return peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name


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

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    st = out_dir / "adapter_model.safetensors"
    tensors = load_file(str(st))
    if dtype != torch.float32:
        tensors = {k: t.to(dtype) for k, t in tensors.items()}
    _save_safetensors(tensors, st)  # rewrite always: deterministic bytes + metadata
    readme = out_dir / "README.md"
    if readme.exists():  # peft's model card: not needed, and not deterministic across versions
        readme.unlink()
    return out_dir
