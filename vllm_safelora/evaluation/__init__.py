"""Safety / utility evaluation through the OpenAI API (``python -m vllm_safelora.evaluation``).

No vLLM or torch import: it talks to any OpenAI-compatible server.
"""

from .harness import (
    GenerationSettings,
    Generation,
    ModelSummary,
    OpenAIEndpoint,
    PromptItem,
    evaluate_model,
    load_prompts,
    score,
    summarize,
    summary_table,
    write_generations,
)
from .scoring import REFUSAL_PHRASES, Judge, OpenAIJudge, RefusalScorer, Verdict, exact_match, load_judge

__all__ = [
    "GenerationSettings",
    "Generation",
    "ModelSummary",
    "OpenAIEndpoint",
    "PromptItem",
    "evaluate_model",
    "load_prompts",
    "score",
    "summarize",
    "summary_table",
    "write_generations",
    "REFUSAL_PHRASES",
    "Judge",
    "OpenAIJudge",
    "RefusalScorer",
    "Verdict",
    "exact_match",
    "load_judge",
]
