"""``vllm-safelora`` command line: build-bank, project, inspect, make-tiny, demo, serve, doctor, issue-key, revoke-key.

Exit codes: 0 success, 1 doctor found a problem, 2 bad usage or configuration,
3 adapter refused, 4 bank problem. Errors are one line on stderr naming what to fix.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

from .errors import AdapterRefused, BankError, ConfigError

EXIT_PROBLEMS, EXIT_USAGE, EXIT_REFUSED, EXIT_BANK = 1, 2, 3, 4


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (Safe LoRA flags, or --policy-file for any policy)")
    g.add_argument(
        "--policy-file",
        metavar="YAML",
        help="policy config of any kind (safelora | splora | salora-style | chain), e.g. "
        "'{kind: chain, steps: [{kind: safelora}, {kind: splora, threshold: 1.5}]}'; "
        "a file with a top-level 'policy:' key (a plugin config) also works. Excludes the Safe LoRA flags",
    )
    g.add_argument("--select", choices=["threshold", "topk", "all"], default=None, help="default threshold")
    g.add_argument("--threshold", type=float, default=None, help="project modules with cosine <= TAU (default 0.35)")
    g.add_argument(
        "--topk", type=int, default=None, help="with --select topk: project the K lowest-cosine modules (default 10)"
    )
    g.add_argument("--projection", choices=["approx", "exact"], default=None, help="default approx")
    g.add_argument("--device", default="cpu", help="device for the bank: cpu, cuda:N or auto")
    g.add_argument("--alias", action="append", default=[], help="another name of the aligned model (repeatable)")
    g.add_argument(
        "--no-base-model-check",
        action="store_true",
        help="do not require the adapter's base_model_name_or_path to name the bank's aligned model",
    )
    g.add_argument("--max-bytes", type=int, default=2 << 30, help="refuse adapters larger than this")


_SAFELORA_FLAGS = ("select", "threshold", "topk", "projection")


def load_policy_file(path: Path):
    """A policy config (any kind) from YAML; ``kind`` defaults to safelora. Raises ConfigError."""
    import yaml
    from pydantic import ValidationError

    from .policies import parse_policy

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    if isinstance(data, dict) and "kind" not in data and isinstance(data.get("policy"), dict):
        data = data["policy"]
    if not isinstance(data, dict):
        raise ConfigError(f"policy file {path} must hold a mapping such as '{{kind: safelora, threshold: 0.35}}'")
    try:
        return parse_policy(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid policy in {path}: {problems}") from exc


def _policy_from_args(args: argparse.Namespace):
    from .policies import SafeLoRAConfig

    given = {k: getattr(args, k) for k in _SAFELORA_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "policy_file", None):
        if given:
            raise ConfigError(
                "--policy-file and the Safe LoRA flags ("
                + ", ".join(f"--{k}" for k in given)
                + ") are exclusive; put the settings in the policy file"
            )
        return load_policy_file(Path(args.policy_file))
    return SafeLoRAConfig(**given)


def _analyse(args: argparse.Namespace):
    from .adapters import ReadLimits, read_adapter
    from .bank import load_bank
    from .apply_policy import project_adapter

    bank = load_bank(Path(args.bank), args.device)
    adapter = read_adapter(Path(args.adapter), limits=ReadLimits(max_bytes=args.max_bytes))
    return project_adapter(
        adapter,
        bank,
        _policy_from_args(args),
        name=str(args.adapter),
        aliases=args.alias,
        require_base_model_match=not args.no_base_model_check,
    )


def cmd_build_bank(args: argparse.Namespace) -> int:
    from .bank import Truncation, build_bank, dense_bank_bytes

    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    safety = None
    if args.safety_prompts:
        from .bank.safety_features import SafetyFeatureSpec

        safety = SafetyFeatureSpec(
            prompts=Path(args.safety_prompts),
            rank=args.safety_rank,
            batch_size=args.safety_batch_size,
            max_samples=args.safety_max_samples,
        )
    if args.features_only:
        from .bank import add_safety_features

        if safety is None:
            raise ConfigError("--features-only needs --safety-prompts FILE.jsonl")
        manifest = add_safety_features(Path(args.out), safety, model=args.aligned, device=args.device)
        sf = manifest.safety_features
        print(
            f"safety features {sf.features_id} added to bank {manifest.bank_id} at {args.out}: "
            f"{sf.samples} samples, {sf.response_tokens} response tokens, r_s = {sf.rank}"
        )
        return 0
    if not args.base or not args.aligned:
        raise ConfigError("build-bank needs --base and --aligned (only --features-only works without --base)")
    manifest = build_bank(
        args.base,
        args.aligned,
        Path(args.out),
        modules=modules,
        truncation=Truncation(rank=args.rank, energy=args.energy),
        storage_dtype=args.dtype,
        device=args.device,
        svd=args.svd,
        aliases=args.alias,
        overwrite=args.overwrite,
        safety=safety,
        fingerprint=None if args.fingerprint == "none" else args.fingerprint,
    )
    if manifest.safety_features is not None:
        sf = manifest.safety_features
        low = min(sf.modules, key=lambda m: m.energy_captured)
        print(
            f"safety features {sf.features_id}: {sf.samples} samples, {sf.response_tokens} response tokens, "
            f"r_s = {sf.rank}; lowest energy captured {low.energy_captured:.3f} ({low.name})"
        )
    kept = sum(m.rank_kept * m.shape[0] for m in manifest.modules)
    print(
        f"bank {manifest.bank_id} written to {args.out}: {len(manifest.modules)} modules, "
        f"{kept} stored U entries (dense C would be {dense_bank_bytes(manifest) / 2**20:.1f} MiB in float32)"
    )
    worst = max(manifest.modules, key=lambda m: m.approx_error_bound)
    if worst.approx_error_bound > 0:
        print(
            f"truncation: worst module {worst.name} keeps rank {worst.rank_kept}/{worst.numerical_rank}, "
            f"energy {worst.energy_kept:.4f}, ||C - C_k||_2 <= {worst.approx_error_bound:.3e}"
        )
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from .apply_policy import write_projected

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


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, render_json, render_table, run_checks

    checks = run_checks(Path(args.config) if args.config else None, args.model)
    print(render_json(checks) if args.json else render_table(checks))
    return EXIT_PROBLEMS if any(c.status == FAIL for c in checks) else 0


def _keys_file(args: argparse.Namespace) -> Path:
    """--keys-file, else auth.keys_file of --config (or $VLLM_SAFELORA_CONFIG): read as YAML only,
    so keys can be managed where the bank is not present."""
    import os

    import yaml

    from .config import CONFIG_ENV

    if args.keys_file:
        return Path(args.keys_file)
    config = args.config or os.environ.get(CONFIG_ENV)
    if not config:
        raise ConfigError(
            f"say which keys file: --keys-file FILE, or --config FILE (or {CONFIG_ENV}) with auth.keys_file"
        )
    try:
        doc = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration {config}: {exc}") from None
    keys = (doc.get("auth") or {}).get("keys_file") if isinstance(doc, dict) else None
    if not keys:
        raise ConfigError(f"configuration {config} sets no auth.keys_file; pass --keys-file FILE")
    return Path(keys)


def cmd_issue_key(args: argparse.Namespace) -> int:
    from .serving.credentials import issue_key

    path = _keys_file(args)
    role = "admin" if args.admin else "tenant"
    key = issue_key(path, args.name, role)
    print(key)
    print(
        f"vllm-safelora: issued {'an operator' if args.admin else 'a'} key for {args.name!r} in {path}; it is shown "
        "only now (the file keeps its hash). The server picks it up without a restart",
        file=sys.stderr,
    )
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from .serving.credentials import revoke_keys

    path = _keys_file(args)
    n = revoke_keys(path, args.name)
    if not n:
        print(f"vllm-safelora: {path} holds no key for {args.name!r}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(
        f"vllm-safelora: revoked {n} key(s) of {args.name!r} in {path}; refused from the next request on",
        file=sys.stderr,
    )
    return 0


def _add_keys_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="plugin configuration whose auth.keys_file to use (default: $VLLM_SAFELORA_CONFIG)")
    g.add_argument("--keys-file", help="the keys file itself")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-safelora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-bank", help="build an alignment bank from base and aligned checkpoints")
    p.add_argument("--base", help="pre-alignment checkpoint: local dir or hub id (required unless --features-only)")
    p.add_argument(
        "--aligned", help="aligned (served) checkpoint: local dir or hub id (required unless --features-only)"
    )
    p.add_argument("--out", required=True, help="bank directory to create")
    p.add_argument("--modules", help="comma-separated module names (default q,k,v,o,gate,up,down_proj; 'all-linear')")
    trunc = p.add_mutually_exclusive_group()
    trunc.add_argument("--rank", type=int, help="keep the top K singular directions per module")
    trunc.add_argument("--energy", type=float, help="keep the fewest directions holding this fraction of ||V||_F^2")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="storage dtype of U")
    p.add_argument("--device", default="cpu", help="where to compute the SVDs: cpu or cuda[:N]")
    p.add_argument("--svd", choices=["full", "lowrank"], default="full", help="lowrank: randomized SVD, needs --rank")
    p.add_argument("--alias", action="append", default=[], help="another name of the aligned model (repeatable)")
    p.add_argument(
        "--fingerprint",
        choices=["sample", "full", "none"],
        default="sample",
        help="record a content fingerprint of the checkpoints' weights, by which a server's --model is recognised "
        "whatever its path or name: sample (default; 16 x 4 KiB per tensor, milliseconds at start-up), full (every "
        "byte: proves identical weights, costs one read of the model at every start-up), none (names only)",
    )
    p.add_argument("--overwrite", action="store_true")
    sg = p.add_argument_group("SaLoRA-style safety features (optional; needs transformers)")
    sg.add_argument(
        "--safety-prompts",
        metavar="FILE.jsonl",
        help='harmful prompts with refusal responses, one {"prompt": ..., "response": ...} per line '
        "(e.g. configs/safety_prompts.jsonl): the aligned model is run on them (on --device) and the top "
        "output directions of every module (response tokens only) are stored as V_s beside the bank",
    )
    sg.add_argument("--safety-rank", type=int, default=32, help="r_s: directions kept per module (default 32)")
    sg.add_argument("--safety-batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    sg.add_argument("--safety-max-samples", type=int, default=None, help="use only the first N samples")
    sg.add_argument(
        "--features-only",
        action="store_true",
        help="add (or replace) safety features in the existing bank at --out; the bank itself is not rebuilt "
        "(--aligned defaults to the bank's aligned model)",
    )
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
        "serve",
        help="start vLLM's OpenAI server with the plugin configured",
        description="vllm-safelora serve --config safelora.yaml -- --model MODEL [vLLM args...]",
    )
    p.add_argument("--config", required=True, help="vllm-safelora YAML configuration")
    p.add_argument(
        "--no-runtime-lora",
        action="store_true",
        help="do not set VLLM_ALLOW_RUNTIME_LORA_UPDATING (disables the resolver and /v1/load_lora_adapter)",
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for vLLM's OpenAI server")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "doctor",
        help="check a deployment without starting vLLM (config, bank, policies, cache, vLLM, environment)",
        description="Every check the plugin makes at start-up, and the environment it needs, listed at once. "
        "Exit status 1 when any check fails.",
    )
    p.add_argument("--config", help="vllm-safelora YAML configuration (default: $VLLM_SAFELORA_CONFIG)")
    p.add_argument("--model", help="the server's --model: check that the bank protects it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "issue-key", help="print a new API key for a tenant (or, with --admin, an operator); only its hash is stored"
    )
    p.add_argument("name", metavar="TENANT", help="the tenant: the first component of its adapters' names")
    p.add_argument(
        "--admin", action="store_true", help="an operator key (load/unload, /metrics, status, every adapter)"
    )
    _add_keys_args(p)
    p.set_defaults(func=cmd_issue_key)

    p = sub.add_parser("revoke-key", help="remove every key of a tenant or operator")
    p.add_argument("name", metavar="NAME")
    _add_keys_args(p)
    p.set_defaults(func=cmd_revoke_key)
    return parser


# Library errors name the config field or argument (Truncation.rank, overwrite=True);
# the CLI reports them with the flag that sets it.
_FLAG_FOR = {
    "Truncation.rank": "--rank",
    "Truncation.energy": "--energy",
    "SafetyFeatureSpec.rank": "--safety-rank",
    "SafetyFeatureSpec.batch_size": "--safety-batch-size",
    "overwrite=True": "--overwrite",
    "modules=[...]": "--modules",
}
_FLAG_WITH_VALUE = re.compile(r"\b(device|svd)='([^']*)'")


def in_flags(message: str) -> str:
    """A library error's message in the CLI's words: each field or argument named by its flag."""
    for term, flag in _FLAG_FOR.items():
        message = message.replace(term, flag)
    return _FLAG_WITH_VALUE.sub(lambda m: f"--{m.group(1)} {m.group(2)}", message)


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
        print(f"vllm-safelora: bank error: {in_flags(str(exc))}", file=sys.stderr)
        return EXIT_BANK
    except (ConfigError, FileExistsError, ValueError) as exc:
        print(f"vllm-safelora: error: {in_flags(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
