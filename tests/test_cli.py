"""The vllm-safelora command line, in-process and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from vllm_safelora.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from vllm_safelora.bank import MANIFEST_FILE, TENSORS_FILE, read_manifest
from vllm_safelora.cli import EXIT_BANK, EXIT_REFUSED, EXIT_USAGE, main
from vllm_safelora.report import REPORT_FILE, AdapterReport


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


@pytest.fixture(scope="module")
def rank2_bank(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bank-r2"
    assert (
        main(
            [
                "build-bank",
                "--base",
                str(tiny_models.base),
                "--aligned",
                str(tiny_models.aligned),
                "--out",
                str(out),
                "--rank",
                "2",
                "--modules",
                "q_proj,v_proj",
            ]
        )
        == 0
    )
    return out


def test_build_bank(tiny_models, tmp_path, capsys):
    out = tmp_path / "bank"
    code, stdout, _ = run(
        capsys,
        "build-bank",
        "--base",
        tiny_models.base,
        "--aligned",
        tiny_models.aligned,
        "--out",
        out,
        "--modules",
        "q_proj,k_proj",
        "--dtype",
        "bfloat16",
        "--alias",
        "org/tiny-chat",
    )
    assert code == 0
    manifest = read_manifest(out)
    assert manifest.bank_id in stdout and str(out) in stdout and "4 modules" in stdout
    assert manifest.storage_dtype == "bfloat16"
    assert manifest.aliases == ["org/tiny-chat"]
    assert {m.name.rsplit(".", 1)[-1] for m in manifest.modules} == {"q_proj", "k_proj"}
    assert (out / TENSORS_FILE).is_file() and (out / MANIFEST_FILE).is_file()
    # again without --overwrite: a bank error; with it: fine
    code, _, err = run(
        capsys,
        "build-bank",
        "--base",
        tiny_models.base,
        "--aligned",
        tiny_models.aligned,
        "--out",
        out,
        "--modules",
        "q_proj",
    )
    assert code == EXIT_BANK and "already exists" in err and "pass --overwrite" in err
    code, _, _ = run(
        capsys,
        "build-bank",
        "--base",
        tiny_models.base,
        "--aligned",
        tiny_models.aligned,
        "--out",
        out,
        "--modules",
        "q_proj",
        "--overwrite",
    )
    assert code == 0 and len(read_manifest(out).modules) == 2


def test_bank_errors_name_the_flags(tiny_models, tmp_path, capsys):
    """The library names fields and arguments (Truncation.rank, svd='lowrank'); the CLI reports its flags."""
    common = ("build-bank", "--base", tiny_models.base, "--aligned", tiny_models.aligned, "--modules", "q_proj")
    code, _, err = run(capsys, *common, "--out", tmp_path / "a", "--rank", "0")
    assert code == EXIT_BANK and "--rank must be >= 1, got 0" in err and "Truncation" not in err
    code, _, err = run(capsys, *common, "--out", tmp_path / "c", "--svd", "lowrank")
    assert code == EXIT_BANK and "--svd lowrank needs --rank K" in err and "svd=" not in err


def test_in_flags_translates_every_library_term():
    from vllm_safelora.cli import in_flags

    assert in_flags("device='cuda:1' requested but CUDA is not available") == (
        "--device cuda:1 requested but CUDA is not available"
    )
    assert in_flags("SafetyFeatureSpec.rank must be >= 1; SafetyFeatureSpec.batch_size too") == (
        "--safety-rank must be >= 1; --safety-batch-size too"
    )
    assert in_flags("check modules=[...] against the names; or pass overwrite=True") == (
        "check --modules against the names; or pass --overwrite"
    )
    assert in_flags("adapter 't/a' is refused") == "adapter 't/a' is refused"  # nothing else changes


def test_build_bank_rank_prints_truncation(rank2_bank, tiny_models, tmp_path, capsys):
    manifest = read_manifest(rank2_bank)
    assert all(m.rank_kept == 2 for m in manifest.modules)
    worst = max(manifest.modules, key=lambda m: m.approx_error_bound)
    code, stdout, _ = run(
        capsys,
        "build-bank",
        "--base",
        tiny_models.base,
        "--aligned",
        tiny_models.aligned,
        "--out",
        tmp_path / "b",
        "--rank",
        "2",
        "--modules",
        "q_proj,v_proj",
    )
    assert code == 0
    assert "keeps rank 2/" in stdout and f"{worst.approx_error_bound:.3e}" in stdout


def test_project_writes_adapter_and_report(tiny_bank_dir, tiny_adapter_random, tmp_path, capsys):
    out = tmp_path / "projected"
    code, stdout, err = run(capsys, "project", tiny_adapter_random, "--bank", tiny_bank_dir, "--out", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE]
    assert (out / CONFIG_FILE).read_bytes() == (tiny_adapter_random / CONFIG_FILE).read_bytes()
    assert _names(out / WEIGHTS_FILE) == _names(tiny_adapter_random / WEIGHTS_FILE)
    report = AdapterReport.model_validate_json((out / REPORT_FILE).read_text())
    assert report.summary.projected == report.summary.modules == 4  # random: every cosine < 0.35
    assert report.summary.output_hash == read_adapter(out).content_hash
    assert report.adapter == str(tiny_adapter_random)
    assert "4/4 modules projected" in stdout and report.summary.output_hash[:16] in stdout
    # existing output without --overwrite: usage error, output untouched
    before = (out / WEIGHTS_FILE).read_bytes()
    code, _, err = run(capsys, "project", tiny_adapter_random, "--bank", tiny_bank_dir, "--out", out)
    assert code == EXIT_USAGE and "already exists" in err and "pass --overwrite" in err
    assert (out / WEIGHTS_FILE).read_bytes() == before
    code, _, _ = run(
        capsys,
        "project",
        tiny_adapter_random,
        "--bank",
        tiny_bank_dir,
        "--out",
        out,
        "--overwrite",
        "--select",
        "topk",
        "--topk",
        "1",
    )
    assert code == 0
    assert AdapterReport.model_validate_json((out / REPORT_FILE).read_text()).summary.projected >= 1


def test_project_unchanged_adapter_is_byte_identical(tiny_bank_dir, tiny_adapter_aligned, tmp_path, capsys):
    out = tmp_path / "projected"
    code, stdout, _ = run(capsys, "project", tiny_adapter_aligned, "--bank", tiny_bank_dir, "--out", out)
    assert code == 0 and "0/4 modules projected" in stdout
    assert (out / WEIGHTS_FILE).read_bytes() == (tiny_adapter_aligned / WEIGHTS_FILE).read_bytes()


def test_inspect_table_and_json(tiny_bank_dir, tiny_adapter_aligned, tmp_path, capsys):
    code, stdout, _ = run(capsys, "inspect", tiny_adapter_aligned, "--bank", tiny_bank_dir)
    assert code == 0
    assert "module" in stdout and "cosine" in stdout
    assert "model.layers.0.self_attn.q_proj" in stdout and "keep" in stdout
    assert "0/4 modules projected" in stdout
    code, stdout, _ = run(capsys, "inspect", tiny_adapter_aligned, "--bank", tiny_bank_dir, "--json", "--select", "all")
    assert code == 0
    report = AdapterReport.model_validate_json(stdout)
    assert report.summary.projected == 4 and report.summary.policy["select"] == "all"
    assert report.summary.bank_id == read_manifest(tiny_bank_dir).bank_id
    assert os.listdir(tmp_path) == []  # inspect writes nothing


def test_inspect_rank_bank_reports_error_bound(rank2_bank, tiny_adapter_random, capsys):
    manifest = read_manifest(rank2_bank)
    worst = max(m.approx_error_bound for m in manifest.modules)
    assert worst > 1e-3  # dropping real alignment directions: a visible bound
    code, stdout, _ = run(capsys, "inspect", tiny_adapter_random, "--bank", rank2_bank)
    assert code == 0
    assert "error bound" in stdout and f"{worst:.3e}" in stdout
    code, stdout, _ = run(capsys, "inspect", tiny_adapter_random, "--bank", rank2_bank, "--json")
    assert json.loads(stdout)["summary"]["max_bank_error_bound"] == pytest.approx(worst)


def test_inspect_prints_exact_mode_note(tmp_path, capsys):
    """Full-rank wide V: exact projection is the identity, and inspect says so."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g)
    for name, t in (("base", w), ("aligned", w + torch.randn(8, 16, generator=g))):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": t}, str(tmp_path / name / "model.safetensors"))
    assert (
        main(
            [
                "build-bank",
                "--base",
                str(tmp_path / "base"),
                "--aligned",
                str(tmp_path / "aligned"),
                "--out",
                str(tmp_path / "bank"),
            ]
        )
        == 0
    )
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / CONFIG_FILE).write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 2,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": str(tmp_path / "aligned"),
            }
        )
    )
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16, generator=g),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g),
        },
        str(ad / WEIGHTS_FILE),
    )
    capsys.readouterr()
    code, stdout, _ = run(capsys, "inspect", ad, "--bank", tmp_path / "bank", "--projection", "exact")
    assert code == 0
    assert "note: exact projection" in stdout and "identity" in stdout


def test_refused_adapter_exit_code(tiny_bank_dir, tiny_adapter_factory, tmp_path, capsys):
    ad = tiny_adapter_factory.copy_to(tmp_path / "dora-adapter", "random")
    cfg = json.loads((ad / CONFIG_FILE).read_text())
    cfg["use_dora"] = True
    (ad / CONFIG_FILE).write_text(json.dumps(cfg))
    for cmd in (
        ["project", ad, "--bank", tiny_bank_dir, "--out", tmp_path / "out"],
        ["inspect", ad, "--bank", tiny_bank_dir],
    ):
        code, stdout, err = run(capsys, *cmd)
        assert code == EXIT_REFUSED == 3
        assert "refused" in err and str(ad) in err and "use_dora" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_base_model_mismatch_exit_code_and_alias(tiny_bank_dir, tiny_adapter_factory, tmp_path, capsys):
    ad = tiny_adapter_factory.copy_to(tmp_path / "other", "random")
    cfg = json.loads((ad / CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = "org/other-model"
    (ad / CONFIG_FILE).write_text(json.dumps(cfg))
    code, _, err = run(capsys, "inspect", ad, "--bank", tiny_bank_dir)
    assert code == EXIT_REFUSED and "org/other-model" in err and "base_model_mismatch" in err
    assert run(capsys, "inspect", ad, "--bank", tiny_bank_dir, "--alias", "org/other-model")[0] == 0
    assert run(capsys, "inspect", ad, "--bank", tiny_bank_dir, "--no-base-model-check")[0] == 0


def test_too_large_adapter_exit_code(tiny_bank_dir, tiny_adapter_random, capsys):
    code, _, err = run(capsys, "inspect", tiny_adapter_random, "--bank", tiny_bank_dir, "--max-bytes", "1000")
    assert code == EXIT_REFUSED and "too_large" in err


def test_bad_bank_exit_code(tiny_adapter_random, tiny_bank_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "inspect", tiny_adapter_random, "--bank", tmp_path / "empty")
    assert code == EXIT_BANK == 4 and "bank error" in err and "build-bank" in err
    # corrupt tensors
    import shutil

    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank_dir, bank)
    data = bytearray((bank / TENSORS_FILE).read_bytes())
    data[-1] ^= 0x80
    (bank / TENSORS_FILE).write_bytes(bytes(data))
    code, _, err = run(capsys, "project", tiny_adapter_random, "--bank", bank, "--out", tmp_path / "out")
    assert code == EXIT_BANK and "corrupt" in err
    assert not (tmp_path / "out").exists()
    # build-bank from a directory that is not a checkpoint
    code, _, err = run(
        capsys, "build-bank", "--base", tmp_path / "empty", "--aligned", tmp_path / "empty", "--out", tmp_path / "b2"
    )
    assert code == EXIT_BANK and "safetensors" in err


def test_usage_errors(tiny_bank_dir, tiny_adapter_random, tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["project"])  # argparse: missing arguments
    assert info.value.code == EXIT_USAGE == 2
    with pytest.raises(SystemExit) as info:
        main(["build-bank", "--base", "a", "--aligned", "b", "--out", "c", "--rank", "2", "--energy", "0.5"])
    assert info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == EXIT_USAGE
    capsys.readouterr()
    # values argparse accepts but the policy does not
    code, _, err = run(capsys, "inspect", tiny_adapter_random, "--bank", tiny_bank_dir, "--threshold", "2")
    assert code == EXIT_USAGE and "threshold" in err
    code, _, err = run(
        capsys, "inspect", tiny_adapter_random, "--bank", tiny_bank_dir, "--select", "topk", "--topk", "-1"
    )
    assert code == EXIT_USAGE


def test_subprocess_end_to_end(tiny_models, tiny_adapter_orthogonal, tmp_path):
    """The real entry point (``python -m vllm_safelora.cli``): exit codes reach the shell."""
    bank, out = tmp_path / "bank", tmp_path / "out"
    assert (
        main(
            [
                "build-bank",
                "--base",
                str(tiny_models.base),
                "--aligned",
                str(tiny_models.aligned),
                "--out",
                str(bank),
                "--modules",
                "q_proj,v_proj",
            ]
        )
        == 0
    )
    assert main(["project", str(tiny_adapter_orthogonal), "--bank", str(bank), "--out", str(out)]) == 0

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vllm_safelora.cli", *map(str, args)], capture_output=True, text=True, timeout=120
        )

    r = cli("inspect", out, "--bank", bank, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["summary"]["modules"] == 4
    assert report["summary"]["bank_id"] == read_manifest(bank).bank_id

    (tmp_path / "bad").mkdir()
    r = cli("inspect", tmp_path / "bad", "--bank", bank)
    assert r.returncode == EXIT_REFUSED
    assert "refused" in r.stderr and str(tmp_path / "bad") in r.stderr

    r = cli("inspect")
    assert r.returncode == EXIT_USAGE


def test_serve_checks_the_configuration_before_starting_vllm(tmp_path, monkeypatch, capsys):
    """`vllm-safelora serve` refuses quickly, before exec'ing vLLM, on a config it cannot use."""
    import vllm_safelora.launcher as launcher

    monkeypatch.setenv("VLLM_SAFELORA_CONFIG", "restored-after-the-test")
    started = []
    monkeypatch.setattr(launcher, "exec_server", lambda *a, **k: started.append(a))
    bad = tmp_path / "bad.yaml"
    bad.write_text("bank: /nonexistent/bank\npolicy: {threshold: 2.0}\n")
    assert main(["serve", "--config", str(bad), "--", "--model", "m"]) == EXIT_USAGE
    assert "threshold" in capsys.readouterr().err
    missing_bank = tmp_path / "missing.yaml"
    missing_bank.write_text(f"bank: {tmp_path / 'no-bank'}\n")
    assert main(["serve", "--config", str(missing_bank), "--", "--model", "m"]) == EXIT_BANK
    assert "build-bank" in capsys.readouterr().err
    assert started == []


def test_serve_execs_vllm_with_the_plugin_environment(tiny_bank_dir, tmp_path, monkeypatch):
    import vllm_safelora.launcher as launcher

    monkeypatch.setenv("VLLM_SAFELORA_CONFIG", "restored-after-the-test")
    calls = []
    monkeypatch.setattr(launcher.os, "execvpe", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    config = tmp_path / "ok.yaml"
    config.write_text(f"bank: {tiny_bank_dir}\ncache_dir: {tmp_path / 'cache'}\n")
    assert main(["serve", "--config", str(config), "--", "--model", "m", "--port", "9"]) == 0
    ((argv, env),) = calls
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == ["--model", "m", "--port", "9", "--enable-lora"]
    assert env["VLLM_SAFELORA_CONFIG"] == str(config.resolve())
    assert env["VLLM_PLUGINS"] == "safelora,safelora_routes"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
