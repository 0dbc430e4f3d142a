"""CLI: evaluate served models / adapters for attack success rate and utility.

    python -m vllm_safelora.evaluation --base-url http://localhost:8000 \\
        --model meta-llama/Llama-2-7b-chat-hf --model purebad \\
        --harmful harmful.jsonl [--benign benign.jsonl] [--judge-base-url URL --judge-model M] \\
        --out results/ [--max-tokens 128] [--concurrency 8]

Every ``--model`` is a name the server serves (the base model or a LoRA adapter; with
vllm-safelora an adapter name is resolved, projected and cached on first use).
Writes ``summary.json``, ``table.md`` and ``generations.jsonl`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .harness import GenerationSettings, OpenAIEndpoint, evaluate_model, load_prompts, summary_table, write_generations
from .scoring import OpenAIJudge, RefusalScorer, load_judge


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_safelora.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base-url", required=True, help="OpenAI-compatible server, e.g. http://localhost:8000 (/v1 is added)"
    )
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", action="append", required=True, help="served model or adapter name (repeatable)")
    p.add_argument("--harmful", type=Path, action="append", default=[], help="JSONL of harmful prompts (repeatable)")
    p.add_argument(
        "--benign",
        type=Path,
        action="append",
        default=[],
        help="JSONL of benign prompts, optional 'answer' (repeatable)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per file")
    p.add_argument("--api", choices=("chat", "completions"), default="chat")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--refusal-phrases",
        type=Path,
        default=None,
        help="file with one refusal phrase per line (replaces the built-in list)",
    )
    judge = p.add_mutually_exclusive_group()
    judge.add_argument(
        "--judge",
        default=None,
        metavar="MODULE:CALLABLE",
        help="a callable (prompt, response) -> Verdict | bool | float, or a class/factory returning one",
    )
    judge.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of an LLM judge")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-api-key", default="EMPTY")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.harmful and not args.benign:
        print("error: give at least one --harmful or --benign prompt file", file=sys.stderr)
        return 2
    items = [it for f in args.harmful for it in load_prompts(f, "harmful", limit=args.limit)]
    items += [it for f in args.benign for it in load_prompts(f, "benign", limit=args.limit)]
    scorer = RefusalScorer.from_file(str(args.refusal_phrases)) if args.refusal_phrases else RefusalScorer()
    judge = None
    if args.judge:
        judge = load_judge(args.judge)
    elif args.judge_base_url:
        if not args.judge_model:
            print("error: --judge-base-url needs --judge-model", file=sys.stderr)
            return 2
        judge = OpenAIJudge(args.judge_base_url, args.judge_model, api_key=args.judge_api_key)
    endpoint = OpenAIEndpoint(
        args.base_url,
        args.api_key,
        GenerationSettings(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            api=args.api,
            system_prompt=args.system_prompt,
            concurrency=args.concurrency,
        ),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    gen_path = args.out / "generations.jsonl"
    summaries = []
    for i, model in enumerate(args.model):
        summary, gens = evaluate_model(endpoint, model, items, scorer=scorer, judge=judge, progress=not args.quiet)
        write_generations(gen_path, gens, append=i > 0)
        summaries.append(summary)
        if not args.quiet:
            print(f"{model}: ASR {summary.asr}, utility {summary.utility} ({summary.seconds:.1f}s)", file=sys.stderr)
    table = summary_table(summaries)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "base_url": args.base_url,
                "settings": asdict(endpoint.settings),
                "refusal_phrases": list(scorer.phrases),
                "judge": args.judge or args.judge_model,
                "models": [asdict(s) for s in summaries],
            },
            indent=2,
        )
        + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
