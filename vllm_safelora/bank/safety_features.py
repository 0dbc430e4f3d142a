"""Offline collection of SaLoRA-style safety features V_s (arXiv 2501.01765, section 3).

For every target linear module of the *aligned* model, V_s (d_out x r_s,
orthonormal columns) spans the top-r_s directions of the module's outputs
Y = X W^T on harmful prompts answered with refusals:

* each sample is a {"prompt": ..., "response": ...} pair from a JSONL file,
  formatted with the tokenizer's chat template when it has one (user turn,
  then assistant turn), else as ``prompt + "\\n" + response``;
* only the RESPONSE tokens' outputs are collected (the prompt's tokens and
  padding are masked out), with no centring, as SaLoRA does;
* V_s = the top-r_s left singular vectors of Y^T (n_tokens x d_out stacked
  rows, transposed), i.e. directions in the module's output space.

They are computed exactly and in bounded memory: forward hooks accumulate the
d_out x d_out Gram matrix G = Y^T Y in float64 per module (the left singular
vectors of Y^T are the eigenvectors of G, its eigenvalues the squared singular
values), so nothing proportional to the number of tokens is kept. Modules are
split over several passes over the prompts when their Gram matrices together
exceed ``max_gram_bytes``. Directions with eigenvalue at round-off (fewer
response tokens than r_s) are dropped; the manifest records what was kept and
the share of ||Y||_F^2 it captures.

Needs ``transformers`` (imported lazily). Imports no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping

import torch

from ..errors import BankError, list_problems

logger = logging.getLogger(__name__)

# Eigenvalues below this fraction of the largest are round-off of float64 Gram
# accumulation over float32 (or bf16) activations, not directions.
_EIG_RTOL = 1e-10


@dataclass(frozen=True)
class SafetyFeatureSpec:
    """How to collect V_s: which prompts, how many directions, and resource bounds."""

    prompts: Path
    rank: int = 32
    max_samples: int | None = None
    batch_size: int = 8
    max_length: int = 1024
    max_gram_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise BankError(f"SafetyFeatureSpec.rank must be >= 1, got {self.rank}")
        if self.batch_size < 1:
            raise BankError(f"SafetyFeatureSpec.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ComputedSafetyFeatures:
    tensors: dict[str, torch.Tensor]
    """'<module>.Vs' -> d_out x k float32 (CPU)."""
    info: dict = field(default_factory=dict)
    """The manifest fields other than ids/hashes (see SafetyFeaturesManifest)."""


def read_safety_prompts(path: Path, max_samples: int | None = None) -> tuple[list[dict[str, str]], str]:
    """Validated (prompt, response) pairs and the file's sha256; every bad line is reported at once."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BankError(f"cannot read safety prompts {path}: {exc.strerror}") from exc
    problems: list[str] = []
    samples: list[dict[str, str]] = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {lineno}: not JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {lineno}: not a JSON object")
            continue
        bad = [k for k in ("prompt", "response") if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if bad:
            problems.append(f"line {lineno}: needs non-empty string(s) {bad}")
            continue
        samples.append({"prompt": obj["prompt"], "response": obj["response"]})
    if problems:
        raise BankError(f"safety prompts {path}: " + list_problems(problems, 10))
    if not samples:
        raise BankError(f'safety prompts {path} hold no samples (want JSONL lines {{"prompt": ..., "response": ...}})')
    if max_samples is not None:
        samples = samples[:max_samples]
    return samples, hashlib.sha256(data).hexdigest()


def tokenize_samples(
    tokenizer, samples: list[dict[str, str]], max_length: int
) -> tuple[list[tuple[list[int], int]], bool]:
    """[(input_ids, first response position)], and whether a chat template was used.

    The response starts where the tokenisation of the prompt part stops being a
    prefix of the tokenisation of the whole conversation (normally at its end).
    """
    use_template = bool(getattr(tokenizer, "chat_template", None))
    out: list[tuple[list[int], int]] = []
    for i, s in enumerate(samples):
        if use_template:
            user = [{"role": "user", "content": s["prompt"]}]
            prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": s["response"]}], tokenize=False
            )
            ids_p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            ids_f = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        else:
            prompt_text = s["prompt"] + "\n"
            ids_p = tokenizer(prompt_text)["input_ids"]
            ids_f = tokenizer(prompt_text + s["response"])["input_ids"]
        start = 0
        while start < min(len(ids_p), len(ids_f)) and ids_p[start] == ids_f[start]:
            start += 1
        ids_f = list(ids_f[:max_length])
        if start >= len(ids_f):
            raise BankError(
                f"safety sample {i + 1}: no response tokens within max_length={max_length} "
                f"(prompt is {start} tokens); shorten the prompt"
            )
        out.append((ids_f, start))
    return out, use_template


def _load_model(ref: str, device: torch.device):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a test/demo extra
        raise BankError("building safety features needs transformers: pip install transformers") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        dtype = torch.float32 if device.type == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except Exception as exc:
        raise BankError(
            f"cannot load model and tokenizer '{ref}' with transformers to collect safety features: {exc}"
        ) from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def _passes(shapes: Mapping[str, tuple[int, int]], max_gram_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name in shapes:
        need = shapes[name][0] ** 2 * 8
        if groups[-1] and used + need > max_gram_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


def collect_output_grams(
    model,
    batches: list[tuple[list[int], int]],
    modules: Mapping[str, tuple[int, int]],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 8,
    max_gram_bytes: int = 4 << 30,
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """G = Y^T Y (float64, CPU) per module over the response tokens, and the number of those tokens."""
    for name, shape in modules.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError as exc:
            raise BankError(f"the model has no module {name} (named in the bank)") from exc
        if not isinstance(mod, torch.nn.Linear) or tuple(mod.weight.shape) != tuple(shape):
            raise BankError(
                f"module {name} of the model is not a {shape[0]} x {shape[1]} nn.Linear "
                f"(got {type(mod).__name__} {tuple(getattr(mod, 'weight', torch.empty(0)).shape)})"
            )
    groups = _passes(modules, max_gram_bytes)
    grams: dict[str, torch.Tensor] = {}
    n_tokens = 0
    order = list(range(0, len(batches), batch_size))
    for gi, group in enumerate(groups):
        acc = {n: torch.zeros(modules[n][0], modules[n][0], dtype=torch.float64, device=device) for n in group}
        state: dict[str, torch.Tensor] = {}

        def make_hook(name: str, acc: dict[str, torch.Tensor] = acc, state: dict[str, torch.Tensor] = state):
            # Bound now: the hooks of this pass write into this pass's accumulators.
            def hook(mod, inputs, output):
                y = output
                if mod.bias is not None:  # X W^T, without the bias
                    y = y - mod.bias
                rows = y[state["mask"]].to(torch.float64)
                acc[name].addmm_(rows.T, rows)

            return hook

        handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in group]
        iterator = order
        if show_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(order, desc=f"safety features (pass {gi + 1}/{len(groups)})", unit="batch")
        try:
            with torch.inference_mode():
                for start in iterator:
                    chunk = batches[start : start + batch_size]
                    width = max(len(ids) for ids, _ in chunk)
                    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    attention = torch.zeros((len(chunk), width), dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.bool)
                    for row, (ids, resp_start) in enumerate(chunk):  # right padding: positions stay 0..n-1
                        input_ids[row, : len(ids)] = torch.tensor(ids)
                        attention[row, : len(ids)] = 1
                        mask[row, resp_start : len(ids)] = True
                    state["mask"] = mask.to(device)
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
                    if gi == 0:
                        n_tokens += int(mask.sum())
        finally:
            for h in handles:
                h.remove()
        for n in group:
            grams[n] = acc[n].cpu()
        del acc
    return grams, n_tokens


def features_from_gram(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Top-``rank`` eigenvectors of G = Y^T Y (the left singular vectors of Y^T), and their energy share."""
    G = G.to(torch.float64)
    G = (G + G.T) / 2
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    k = int((evals > top * _EIG_RTOL).sum()) if top > 0 else 0
    k = min(k, rank)
    V = evecs[:, :k]
    # Deterministic signs: the largest-magnitude entry of each direction is positive.
    if k:
        idx = V.abs().argmax(dim=0)
        V = V * torch.sign(V[idx, torch.arange(k)]).unsqueeze(0)
    trace = float(torch.trace(G))
    energy = float(evals[:k].sum()) / trace if trace > 0 else 0.0
    return V.to(torch.float32).contiguous(), energy


def compute_safety_features(
    model_ref: str,
    modules: Mapping[str, tuple[int, int]],
    spec: SafetyFeatureSpec,
    *,
    device: str = "cpu",
    show_progress: bool = True,
    model=None,
    tokenizer=None,
) -> ComputedSafetyFeatures:
    """Run ``model_ref`` (the aligned model) on the spec's prompts and compute V_s for ``modules``."""
    samples, prompts_sha = read_safety_prompts(spec.prompts, spec.max_samples)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BankError(f"device={device!r} requested but CUDA is not available")
    if model is None or tokenizer is None:
        model, tokenizer = _load_model(model_ref, dev)
    batches, templated = tokenize_samples(tokenizer, samples, spec.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    grams, n_tokens = collect_output_grams(
        model,
        batches,
        modules,
        pad_id=pad_id,
        device=dev,
        batch_size=spec.batch_size,
        max_gram_bytes=spec.max_gram_bytes,
        show_progress=show_progress,
    )
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name in modules:
        V, energy = features_from_gram(grams.pop(name), spec.rank)
        tensors[f"{name}.Vs"] = V.cpu()
        entries.append(
            {"name": name, "d_out": int(modules[name][0]), "rank_kept": int(V.shape[1]), "energy_captured": energy}
        )
    short = [e["name"] for e in entries if e["rank_kept"] < spec.rank]
    if short:
        logger.warning(
            "safety features: %d module(s) keep fewer than r_s=%d directions (only %d response tokens, or "
            "d_out < r_s), e.g. %s",
            len(short),
            spec.rank,
            n_tokens,
            short[0],
        )
    info = {
        "model": str(model_ref),
        "prompts_file": Path(spec.prompts).name,
        "prompts_sha256": prompts_sha,
        "samples": len(samples),
        "response_tokens": n_tokens,
        "rank": spec.rank,
        "chat_template": templated,
        "modules": entries,
    }
    return ComputedSafetyFeatures(tensors=tensors, info=info)
