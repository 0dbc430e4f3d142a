"""The README's main job, on the embedded tiny model: make models and adapters, build a bank, project."""

from __future__ import annotations

from pathlib import Path

# Tenants' adapters in the demo: (served name, direction of the update relative to
# the alignment subspace). "aligned" updates keep high cosines and are left alone,
# "orthogonal" ones move away from alignment and get projected.
DEMO_ADAPTERS = {
    "acme/support-bot": "aligned",
    "globex/jailbreak": "orthogonal",
    "initech/summarizer": "random",
}


def make_tiny_demo(out: Path) -> dict[str, Path]:
    """Tiny base + aligned models and one adapter per demo tenant under ``out``."""
    from .tiny import make_tiny_adapter, make_tiny_models

    out = Path(out)
    models = make_tiny_models(out / "models")
    paths = {"base": models.base, "aligned": models.aligned}
    for i, (name, direction) in enumerate(DEMO_ADAPTERS.items()):
        target = out / "adapters" / name
        if not (target / "adapter_model.safetensors").exists():
            make_tiny_adapter(
                models.aligned,
                target,
                seed=100 + i,
                direction=direction,
                base_dir=models.base,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            )
        paths[name] = target
    return paths


def run_offline_demo(workdir: Path) -> int:
    from .adapters import read_adapter
    from .bank import build_bank, load_bank
    from .apply_policy import project_adapter, write_projected
    from .policies import SafeLoRAConfig

    workdir = Path(workdir)
    paths = make_tiny_demo(workdir)
    bank_dir = workdir / "bank"
    if not (bank_dir / "manifest.json").exists():
        build_bank(str(paths["base"]), str(paths["aligned"]), bank_dir, overwrite=True)
    bank = load_bank(bank_dir, "cpu")
    print(f"bank {bank.bank_id}: {len(bank.subspaces)} modules, {bank.nbytes / 1024:.1f} KiB on {bank.device}")
    policy = SafeLoRAConfig(select="threshold", threshold=0.35)
    for name in DEMO_ADAPTERS:
        adapter = read_adapter(paths[name], name=name)
        outcome = project_adapter(adapter, bank, policy, name=name)
        write_projected(outcome, workdir / "projected" / name, overwrite=True)
        print(f"\n== {name} ({outcome.report.summary.outcome}) ==")
        print(outcome.report.table())
    print(f"\nprojected adapters and their safelora_report.json are under {workdir / 'projected'}")
    return 0


def _write_demo_config(workdir: Path, bank_dir: Path) -> Path:
    config = workdir / "safelora.yaml"
    config.write_text(
        "# written by `vllm-safelora demo`; see configs/example.yaml for every key\n"
        f"bank: {bank_dir}\n"
        f"adapter_dirs: [{workdir / 'adapters'}]\n"
        f"cache_dir: {workdir / 'cache'}\n"
        "device: auto\n"
        "policy: {select: threshold, threshold: 0.35, projection: approx}\n"
        "admission: {min_cosine: -0.5}\n"
    )
    return config


def _make_broken_adapter(good: Path, target: Path) -> Path:
    """A tenant upload with a NaN in it: the server must refuse it and keep serving."""
    import shutil

    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(good, target)
    tensors = load_file(target / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, target / "adapter_model.safetensors")
    return target


def run_served_demo(workdir: Path, *, port: int = 0) -> int:
    """Serve the tiny model with the plugin, talk to it with the openai client, show reports and metrics."""
    import openai
    import requests

    from .bank import build_bank
    from .launcher import ServerProcess, free_port, plugin_environment
    from .report import AdapterReport

    workdir = Path(workdir).resolve()
    paths = make_tiny_demo(workdir)
    bank_dir = workdir / "bank"
    if not (bank_dir / "manifest.json").exists():
        build_bank(str(paths["base"]), str(paths["aligned"]), bank_dir, overwrite=True)
    _make_broken_adapter(paths["acme/support-bot"], workdir / "adapters" / "hooli" / "broken")
    config = _write_demo_config(workdir, bank_dir)

    env = plugin_environment(config)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server = ServerProcess(
        args=[
            "--model",
            str(paths["aligned"]),
            "--max-lora-rank",
            "8",
            "--max-loras",
            "2",
            "--dtype",
            "float32",
            "--lora-modules",
            f"acme/support-bot={paths['acme/support-bot']}",
        ],
        env=env,
        log_path=workdir / "server.log",
        port=port or free_port(),
    )
    print(f"starting vLLM with vllm-safelora on {server.base_url} (log: {server.log_path}); about a minute on CPU ...")
    tenants = [*DEMO_ADAPTERS, "hooli/broken"]
    with server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="demo")
        for name in tenants:
            try:
                chat = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hello there"}], max_tokens=8, temperature=0
                )
                done = client.completions.create(model=name, prompt="the quick brown", max_tokens=8, temperature=0)
                print(
                    f"[{name}] served: chat {chat.usage.completion_tokens} tokens, "
                    f"completion {done.usage.completion_tokens} tokens"
                )
            except openai.APIStatusError as exc:
                print(f"[{name}] refused with HTTP {exc.status_code}: {exc.message}")
        for name in tenants:
            r = requests.get(f"{server.base_url}/safelora/v1/adapters/{name}", timeout=10)
            if r.status_code == 200:
                report = AdapterReport.model_validate(
                    {k: v for k, v in r.json().items() if k in AdapterReport.model_fields}
                )
                print(f"\n== report for {name} ({report.summary.outcome}) ==\n{report.table()}")
        metrics = requests.get(f"{server.base_url}/metrics", timeout=10).text
        print("\n== safelora metrics on vLLM's /metrics ==")
        for line in metrics.splitlines():
            if line.startswith("safelora_") and "_created" not in line and "_bucket" not in line:
                print(line)
    print(f"\nserver stopped; patched adapters are cached under {workdir / 'cache'}")
    return 0
