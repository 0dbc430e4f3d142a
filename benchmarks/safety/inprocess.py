"""Evaluate many adapter variants in one process: merge each variant's update into the aligned model.

The selection miniature evaluates hundreds of variants (policies, controls, seeds, a detection
population). Serving each through vLLM on a shared 2-core machine would dominate the run, so the
update dW = s B A of every module is added to the aligned model's weights in place, the held-out
prompts are decoded greedily with transformers (as the served miniature's in-process rows are), and
the weights are restored. The served miniature (``miniature.py``) showed served == in-process
greedy outputs for the aligned model; merged LoRA differs from vLLM's unmerged LoRA only by
float32 round-off, which can flip a rare greedy tie.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

import torch

from vllm_safelora.evaluation.harness import score
from vllm_safelora.evaluation.scoring import RefusalScorer

from . import train as T
from .miniature import row_summary, world_judge


@dataclass(frozen=True)
class Update:
    """One module's LoRA factors as served: dW = scale * B @ A."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


def adapter_updates(adapter) -> dict[str, Update]:
    """``{module: Update}`` of a :class:`vllm_safelora.adapters.LoraAdapter` (or a policy's adapter_view)."""
    return {n: Update(m.lora_A, m.lora_B, m.scale) for n, m in adapter.modules.items()}


class MergedEvaluator:
    def __init__(self, aligned_dir: Path, tok, items, max_tokens: int, batch_size: int = 256):
        self.model = T.load_model(aligned_dir)
        self.tok, self.items, self.max_tokens, self.batch_size = tok, items, max_tokens, batch_size
        self.linears = {n: m for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.prompts = [it.prompt for it in items]

    @torch.no_grad()
    def generate(self, updates: Mapping[str, Update] | None) -> list[str]:
        saved = {}
        try:
            for name, u in (updates or {}).items():
                w = self.linears[name].weight
                saved[name] = w.detach().clone()
                w.add_(u.delta().to(w.dtype))
            return T.greedy_generate(
                self.model, self.tok, self.prompts, max_new_tokens=self.max_tokens, batch_size=self.batch_size
            )
        finally:
            for name, w0 in saved.items():
                self.linears[name].weight.copy_(w0)

    def evaluate(self, name: str, updates: Mapping[str, Update] | None) -> tuple[dict, list]:
        """(the miniature's summary row, the scored generations)."""
        t0 = time.perf_counter()
        outs = self.generate(updates)
        gens = score(name, self.items, [(o, None) for o in outs], scorer=RefusalScorer(), judge=world_judge)
        return row_summary(name, gens, time.perf_counter() - t0), gens


class ResultCache:
    """Evaluated rows keyed on (evaluation context, weights fingerprint), kept in a JSON file in the workdir.

    The context digests what else decides a row (the aligned model's training key, the prompts, the token
    budget), so a re-run that adds settings or adapters evaluates only what is new.
    """

    def __init__(self, path: Path, context: str):
        import json

        self.path, self.context = Path(path), context
        self.rows: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.hits = 0

    def get(self, fp: str) -> dict | None:
        row = self.rows.get(f"{self.context}|{fp}")
        self.hits += row is not None
        return row

    def put(self, fp: str, row: dict) -> None:
        self.rows[f"{self.context}|{fp}"] = row

    def save(self) -> None:
        import json

        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows))
        tmp.replace(self.path)
