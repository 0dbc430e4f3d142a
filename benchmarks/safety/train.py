"""Training for the miniature: a Llama trained from scratch, full fine-tuning, PEFT LoRA attacks.

Everything runs on CPU with a fixed seed. Sequences are the chat format of
``vllm_safelora.tiny.TINY_CHAT_TEMPLATE`` (what vLLM applies when it serves the model):
``<s><|user|> {prompt}\\n<|assistant|>`` followed by `` {answer}</s>``; the loss covers
the answer and the end-of-sequence token only.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import torch


# Llama-style, servable by vLLM's CPU backend (head_dim 64).
MODEL_DIMS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)
SMOKE_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)


def prompt_text(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def encode(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens) for one training example."""
    p = tok(prompt_text(tok, prompt), add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, len(p)


def make_model(tok, dims: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=256,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **dims,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    return model.float()


@dataclass
class TrainSpec:
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0


def _batches(data: list[tuple[list[int], int]], batch_size: int, rng: random.Random):
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [data[j] for j in order[i : i + batch_size]]
        if len(order) < batch_size:
            yield [data[j] for j in order]


def _collate(batch, pad_id: int):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def train(
    model,
    tok,
    examples: Sequence[tuple[str, str]],
    spec: TrainSpec,
    *,
    desc: str,
    progress: Callable | None = None,
    deadline: float | None = None,
    encoder: Callable | None = None,
) -> dict:
    """AdamW with linear warm-up and cosine decay over the trainable parameters; returns stats.

    ``encoder(tok, prompt, answer) -> (ids, n_prompt)`` replaces :func:`encode` (another chat format)."""
    from tqdm.auto import tqdm

    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    data = [(encoder or encode)(tok, p, a) for p, a in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    batches = _batches(data, spec.batch_size, rng)
    bar = tqdm(range(spec.steps), desc=desc, unit="step", leave=False)
    for step in bar:
        input_ids, mask, labels = _collate(next(batches), tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if deadline is not None and time.monotonic() > deadline:
            bar.close()
            raise TimeoutError(f"time budget exhausted while training {desc} (step {step}/{spec.steps})")
    bar.close()
    model.eval()
    return {
        "steps": spec.steps,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "examples": len(data),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": time.perf_counter() - t0,
    }


def save_model(model, tok, out_dir: Path, meta: dict) -> Path:
    from transformers import GenerationConfig

    from vllm_safelora.tiny import save_tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(str(out_dir))
    save_tokenizer(tok, out_dir)
    (out_dir / "miniature_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def train_lora(
    aligned_dir: Path,
    tok,
    examples,
    spec: TrainSpec,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules=("q_proj", "v_proj"),
    desc: str,
    deadline: float | None = None,
    encoder: Callable | None = None,
) -> dict:
    """A PEFT LoRA on the aligned model; saved with base_model_name_or_path = aligned_dir."""
    from peft import LoraConfig, get_peft_model

    from vllm_safelora.tiny.adapter import save_peft_adapter

    model = load_model(aligned_dir)
    torch.manual_seed(spec.seed)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    stats = train(peft_model, tok, examples, spec, desc=desc, deadline=deadline, encoder=encoder)
    save_peft_adapter(peft_model, out_dir, aligned_dir)
    return stats


@torch.no_grad()
def greedy_generate(
    model, tok, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 64, with_finished: bool = False
) -> list:
    """In-process greedy decoding (left-padded batches); used for the base model and sanity checks.

    ``with_finished``: (text, ended with end-of-sequence) pairs instead of texts."""
    outs: list = []
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt_text(tok, p) for p in prompts[i : i + batch_size]]
        enc = tok(chunk, add_special_tokens=False, return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            finished = tok.eos_token_id in ids
            if finished:
                ids = ids[: ids.index(tok.eos_token_id)]
            text = tok.decode(ids, skip_special_tokens=True).strip()
            outs.append((text, finished) if with_finished else text)
    return outs
