"""Safety / utility evaluation of a served model or adapter through the OpenAI API.

Point it at any OpenAI-compatible server (vLLM with or without vllm-safelora, or
anything else), name the model (a base model or a served LoRA adapter), give it prompt
sets as JSONL, and it reports:

* **ASR** (attack success rate) on harmful prompts: the fraction of responses that
  contain no refusal phrase (:class:`~vllm_safelora.evaluation.scoring.RefusalScorer`);
* **utility** on benign prompts that carry a reference ``answer``: exact-match accuracy
  (per ``task`` too);
* optionally the **judge harmfulness rate**: the fraction of harmful prompts an LLM judge
  (or any callable) calls harmful.

Prompt-set JSONL: one object per line with the request in ``prompt`` (or ``goal`` /
``instruction``, as in AdvBench-style files) or a full ``messages`` list; optional
``answer`` (benign: reference for exact match), ``task`` (grouping) and ``id``.
Decoding is greedy (temperature 0) unless told otherwise.

This module imports neither vLLM nor torch.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence

from .scoring import Judge, RefusalScorer, exact_match, rate

PROMPT_KEYS = ("prompt", "goal", "instruction", "question")


@dataclass(frozen=True)
class PromptItem:
    id: str
    kind: str  # "harmful" | "benign"
    prompt: str | None = None
    messages: tuple | None = None
    answer: str | None = None
    task: str = ""

    def as_messages(self, system: str | None = None) -> list[dict]:
        if self.messages is not None:
            msgs = [dict(m) for m in self.messages]
        else:
            msgs = [{"role": "user", "content": self.prompt}]
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    @property
    def text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return next((m["content"] for m in reversed(self.messages or ()) if m.get("role") == "user"), "")


def load_prompts(path: str | Path, kind: str, *, limit: int | None = None) -> list[PromptItem]:
    """Read a JSONL prompt set (see the module docstring); ``kind`` is harmful or benign."""
    if kind not in ("harmful", "benign"):
        raise ValueError(f"kind must be harmful or benign, got {kind!r}")
    items: list[PromptItem] = []
    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc
        if isinstance(obj, str):
            obj = {"prompt": obj}
        prompt = next((obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str)), None)
        messages = obj.get("messages")
        if prompt is None and not isinstance(messages, list):
            raise ValueError(f"{path}:{lineno}: needs one of {PROMPT_KEYS} (a string) or 'messages' (a list)")
        items.append(
            PromptItem(
                id=str(obj.get("id", f"{path.stem}-{lineno}")),
                kind=kind,
                prompt=prompt,
                messages=tuple(messages) if prompt is None else None,
                answer=obj.get("answer") if kind == "benign" else None,
                task=str(obj.get("task", obj.get("category", ""))),
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


@dataclass
class Generation:
    model: str
    id: str
    kind: str
    task: str
    prompt: str
    response: str
    finish_reason: str | None
    refusal: bool
    attack_success: bool | None = None  # harmful only
    correct: bool | None = None  # benign with a reference answer only
    answer: str | None = None
    judge_harmful: bool | None = None
    judge_raw: str | None = None


@dataclass
class ModelSummary:
    model: str
    n_harmful: int
    n_benign: int
    asr: float | None
    """keyword attack success rate on harmful prompts (1 - refusal rate)"""
    utility: float | None
    """exact-match accuracy on benign prompts with a reference answer"""
    benign_refusal_rate: float | None
    """over-refusal: benign prompts answered with a refusal phrase"""
    judge_harmful_rate: float | None = None
    utility_by_task: dict[str, float] = field(default_factory=dict)
    asr_by_task: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 0.0
    api: str = "chat"  # chat | completions
    system_prompt: str | None = None
    concurrency: int = 8
    request_timeout: float = 300.0
    extra_body: dict = field(default_factory=dict)


class OpenAIEndpoint:
    """Greedy generations from one OpenAI-compatible server (thread-parallel requests)."""

    def __init__(self, base_url: str, api_key: str = "EMPTY", settings: GenerationSettings | None = None):
        import openai

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.settings = settings or GenerationSettings()
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=2, timeout=self.settings.request_timeout
        )

    def generate_one(self, model: str, item: PromptItem) -> tuple[str, str | None]:
        s = self.settings
        if s.api == "completions":
            if item.prompt is None:
                raise ValueError(f"{item.id}: the completions API needs a 'prompt', not 'messages'")
            out = self.client.completions.create(
                model=model,
                prompt=item.prompt,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                extra_body=s.extra_body or None,
            )
            c = out.choices[0]
            return c.text, c.finish_reason
        out = self.client.chat.completions.create(
            model=model,
            messages=item.as_messages(s.system_prompt),
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            extra_body=s.extra_body or None,
        )
        c = out.choices[0]
        return c.message.content or "", c.finish_reason

    def generate(
        self, model: str, items: Sequence[PromptItem], *, progress: bool = False
    ) -> list[tuple[str, str | None]]:
        with ThreadPoolExecutor(max_workers=max(1, self.settings.concurrency)) as pool:
            futures = [pool.submit(self.generate_one, model, it) for it in items]
            it = futures
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(futures, desc=model, unit="req", leave=False)
            return [f.result() for f in it]


def score(
    model: str,
    items: Sequence[PromptItem],
    outputs: Sequence[tuple[str, str | None]],
    *,
    scorer: RefusalScorer | None = None,
    judge: Judge | None = None,
    judge_concurrency: int = 4,
) -> list[Generation]:
    scorer = scorer or RefusalScorer()
    gens: list[Generation] = []
    for item, (text, finish) in zip(items, outputs):
        refusal = scorer.is_refusal(text)
        g = Generation(
            model=model,
            id=item.id,
            kind=item.kind,
            task=item.task,
            prompt=item.text,
            response=text,
            finish_reason=finish,
            refusal=refusal,
            answer=item.answer,
        )
        if item.kind == "harmful":
            g.attack_success = not refusal
        elif item.answer is not None:
            g.correct = exact_match(text, item.answer)
        gens.append(g)
    if judge is not None:
        harmful = [g for g in gens if g.kind == "harmful"]
        with ThreadPoolExecutor(max_workers=max(1, judge_concurrency)) as pool:
            verdicts = list(pool.map(lambda g: judge(g.prompt, g.response), harmful))
        for g, v in zip(harmful, verdicts):
            g.judge_harmful = v.harmful
            g.judge_raw = v.raw
    return gens


def summarize(model: str, gens: Sequence[Generation], seconds: float = 0.0) -> ModelSummary:
    harmful = [g for g in gens if g.kind == "harmful"]
    benign = [g for g in gens if g.kind == "benign"]
    checked = [g for g in benign if g.correct is not None]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for g in checked:
        by_task[g.task or "all"].append(bool(g.correct))
    asr_task: dict[str, list[bool]] = defaultdict(list)
    for g in harmful:
        asr_task[g.task or "all"].append(bool(g.attack_success))
    judged = [g.judge_harmful for g in harmful if g.judge_harmful is not None]
    return ModelSummary(
        model=model,
        n_harmful=len(harmful),
        n_benign=len(benign),
        asr=rate(g.attack_success for g in harmful),
        utility=rate(g.correct for g in checked),
        benign_refusal_rate=rate(g.refusal for g in benign),
        judge_harmful_rate=rate(judged) if judged else None,
        utility_by_task={k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        asr_by_task={k: sum(v) / len(v) for k, v in sorted(asr_task.items())},
        seconds=seconds,
    )


def evaluate_model(
    endpoint: OpenAIEndpoint,
    model: str,
    items: Sequence[PromptItem],
    *,
    scorer: RefusalScorer | None = None,
    judge: Judge | None = None,
    progress: bool = False,
) -> tuple[ModelSummary, list[Generation]]:
    """Generate for every item with ``model`` on ``endpoint``, score, summarise."""
    t0 = time.perf_counter()
    outputs = endpoint.generate(model, items, progress=progress)
    gens = score(model, items, outputs, scorer=scorer, judge=judge)
    return summarize(model, gens, time.perf_counter() - t0), gens


def write_generations(
    path: Path, gens: Iterable[Generation], *, append: bool = False, extra: dict | None = None
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for g in gens:
            row = asdict(g)
            if extra:
                row.update(extra)
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(summaries: Sequence[ModelSummary]) -> str:
    """Markdown: model | utility | ASR | judge | benign refusals | n."""
    rows = [
        "| model | utility (exact match) | ASR (keyword) | judge harmful | benign refusals | n harmful / benign |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        rows.append(
            f"| {s.model} | {_pct(s.utility)} | {_pct(s.asr)} | {_pct(s.judge_harmful_rate)} | "
            f"{_pct(s.benign_refusal_rate)} | {s.n_harmful} / {s.n_benign} |"
        )
    return "\n".join(rows)
