"""``vllm-safelora`` command line: build-bank, project, inspect, make-tiny, demo, serve.

Exit codes: 0 success, 2 bad usage or configuration, 3 adapter refused,
4 bank problem. Errors are one line on stderr naming what to fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import AdapterRefused, BankError, ConfigError

EXIT_USAGE, EXIT_REFUSED, EXIT_BANK = 2, 3, 4


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Safe LoRA policy")
    g.add_argument("--select", choices=["threshold", "topk", "all"], default="threshold")
    g.add_argument("--threshold", type=float, default=0.35, help="project modules with cosine <= TAU (default 0.35)")
    g.add_argument("--topk", type=int, default=10, help="with --select topk: project the K lowest-cosine modules")
    g.add_argument("--projection", choices=["approx", "exact"], default="approx")
    g.add_argument("--device", default="cpu", help="device for the bank: cpu, cuda:N or auto")
    g.add_argument("--alias", action="append", default=[], help="another name of the aligned model (repeatable)")
    g.add_argument(
        "--no-base-model-check", action="store_true",
        help="do not require the adapter's base_model_name_or_path to name the bank's aligned model",
    )
    g.add_argument("--max-bytes", type=int, default=2 << 30, help="refuse adapters larger than this")


def _policy_from_args(args: argparse.Namespace):
    from .policies import SafeLoRAConfig

    return SafeLoRAConfig(select=args.select, threshold=args.threshold, topk=args.topk, projection=args.projection)


def _analyse(args: argparse.Namespace):
    from .adapters import ReadLimits, read_adapter
    from .bank import load_bank
    from .engine import project_adapter

    bank = load_bank(Path(args.bank), args.device)
    adapter = read_adapter(Path(args.adapter), limits=ReadLimits(max_bytes=args.max_bytes))
    return project_adapter(
        adapter, bank, _policy_from_args(args),
        name=str(args.adapter), aliases=args.alias, require_base_model_match=not args.no_base_model_check,
    )


def cmd_build_bank(args: argparse.Namespace) -> int:
    from .bank import Truncation, build_bank, dense_bank_bytes

    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    manifest = build_bank(
        args.base, args.aligned, Path(args.out),
        modules=modules, truncation=Truncation(rank=args.rank, energy=args.energy),
        storage_dtype=args.dtype, device=args.device, svd=args.svd, aliases=args.alias, overwrite=args.overwrite,
    )
    kept = sum(m.rank_kept * m.shape[0] for m in manifest.modules)
    print(f"bank {manifest.bank_id} written to {args.out}: {len(manifest.modules)} modules, "
          f"{kept} stored U entries (dense C would be {dense_bank_bytes(manifest) / 2**20:.1f} MiB in float32)")
    worst = max(manifest.modules, key=lambda m: m.approx_error_bound)
    if worst.approx_error_bound > 0:
        print(f"truncation: worst module {worst.name} keeps rank {worst.rank_kept}/{worst.numerical_rank}, "
              f"energy {worst.energy_kept:.4f}, ||C - C_k||_2 <= {worst.approx_error_bound:.3e}")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from .engine import write_projected

    outcome = _analyse(args)
    write_projected(outcome, Path(args.out), overwrite=args.overwrite)
    print(outcome.report.table())
    print(f"wrote {args.out} (output hash {outcome.report.summary.output_hash[:16]}...)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    outcome = _analyse(args)
    if args.json:
        print(outcome.report.model_dump_json(indent=2))
    else:
        print(outcome.report.table())
        for note in outcome.report.notes:
            print(f"note: {note}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .demo import make_tiny_demo

    paths = make_tiny_demo(Path(args.out))
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_offline_demo, run_served_demo

    if args.offline:
        return run_offline_demo(Path(args.workdir))
    return run_served_demo(Path(args.workdir), port=args.port)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .bank import read_manifest
    from .config import CONFIG_ENV, load_settings
    from .launcher import exec_server

    config = Path(args.config).resolve()
    os.environ[CONFIG_ENV] = str(config)
    # Check here for a quick, readable failure; the plugin checks again in every vLLM process.
    settings = load_settings()
    read_manifest(settings.bank)
    vllm_args = list(args.vllm_args)
    if vllm_args[:1] == ["--"]:
        vllm_args = vllm_args[1:]
    exec_server(config, vllm_args, runtime_lora=not args.no_runtime_lora)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-safelora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-bank", help="build an alignment bank from base and aligned checkpoints")
    p.add_argument("--base", required=True, help="pre-alignment checkpoint: local dir or hub id")
    p.add_argument("--aligned", required=True, help="aligned (served) checkpoint: local dir or hub id")
    p.add_argument("--out", required=True, help="bank directory to create")
    p.add_argument("--modules", help="comma-separated module names (default q,k,v,o,gate,up,down_proj; 'all-linear')")
    trunc = p.add_mutually_exclusive_group()
    trunc.add_argument("--rank", type=int, help="keep the top K singular directions per module")
    trunc.add_argument("--energy", type=float, help="keep the fewest directions holding this fraction of ||V||_F^2")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="storage dtype of U")
    p.add_argument("--device", default="cpu", help="where to compute the SVDs: cpu or cuda[:N]")
    p.add_argument("--svd", choices=["full", "lowrank"], default="full", help="lowrank: randomized SVD, needs --rank")
    p.add_argument("--alias", action="append", default=[], help="another name of the aligned model (repeatable)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_build_bank)

    p = sub.add_parser("project", help="project an adapter and write the patched copy with its report")
    p.add_argument("adapter", help="PEFT LoRA adapter directory")
    p.add_argument("--bank", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_policy_args(p)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("inspect", help="score an adapter against a bank without writing anything")
    p.add_argument("adapter")
    p.add_argument("--bank", required=True)
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    _add_policy_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-tiny", help="make tiny base/aligned models and adapters for tests and demos")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded tiny model (starts a vLLM server)")
    p.add_argument("--workdir", default=".demo")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--offline", action="store_true", help="only build the bank and project adapters; no server")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve", help="start vLLM's OpenAI server with the plugin configured",
        description="vllm-safelora serve --config safelora.yaml -- --model MODEL [vLLM args...]",
    )
    p.add_argument("--config", required=True, help="vllm-safelora YAML configuration")
    p.add_argument(
        "--no-runtime-lora", action="store_true",
        help="do not set VLLM_ALLOW_RUNTIME_LORA_UPDATING (disables the resolver and /v1/load_lora_adapter)",
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for vLLM's OpenAI server")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AdapterRefused as exc:
        print(f"vllm-safelora: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BankError as exc:
        print(f"vllm-safelora: bank error: {exc}", file=sys.stderr)
        return EXIT_BANK
    except (ConfigError, FileExistsError, ValueError) as exc:
        print(f"vllm-safelora: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
