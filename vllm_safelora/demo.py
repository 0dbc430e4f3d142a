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
                models.aligned, target, seed=100 + i, direction=direction, base_dir=models.base,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            )
        paths[name] = target
    return paths


def run_offline_demo(workdir: Path) -> int:
    from .adapters import read_adapter
    from .bank import build_bank, load_bank
    from .engine import project_adapter, write_projected
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
