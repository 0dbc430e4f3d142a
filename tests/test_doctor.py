"""``vllm-safelora doctor``: in-process, no vLLM server.

One test per misconfiguration that the fail-closed start-up tests make a real server
refuse (tests/e2e/test_startup_failures.py, tests/hardening/test_startup_fail_closed.py):
doctor must report it as a failed check, in the words the server stops with, and exit
non-zero. Plus the environment a plugin server needs, every problem at once, and --json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from vllm_safelora.cli import EXIT_PROBLEMS, main

GOOD_ENV = {"VLLM_PLUGINS": "safelora,safelora_routes", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}

# case: (config edits (a dict merged into a good config, raw YAML text, or None for no
#        configuration at all), the check that must fail, fragments its detail must hold)
CASES = {
    # tests/e2e/test_startup_failures.py
    "no_config": (None, "config", ("not configured", "VLLM_SAFELORA_CONFIG", "Refusing to serve adapters unprotected")),
    "bank_missing": ({"bank": "{work}/no-such-bank"}, "bank", ("no alignment bank at", "vllm-safelora build-bank")),
    "bank_corrupt": ({"bank": "{corrupt_bank}"}, "bank intact", ("is corrupt", "bank.safetensors", "rebuild the bank")),
    "bank_other_model": (
        {"bank": "{other_bank}"},
        "bank protects model",
        ("was built for aligned model", "Build a bank for the served model"),
    ),
    # tests/hardening/test_startup_fail_closed.py
    "cache_dir_under_file": (
        {"cache_dir": "{file}/sub"},
        "cache",
        ("patched-adapter cache directory", "cannot be created", "make it writable"),
    ),
    "threshold_out_of_range": (
        {"policy": {"select": "threshold", "threshold": 2.0}},
        "config",
        ("invalid vllm-safelora configuration", "threshold", "less than or equal to 1"),
    ),
    "select_bogus": (
        {"policy": {"select": "bogus"}},
        "config",
        ("invalid vllm-safelora configuration", "select", "'threshold', 'topk' or 'all'"),
    ),
    "unknown_key": (
        {"polcy": {"select": "all"}},
        "config",
        ("invalid vllm-safelora configuration", "polcy", "Extra inputs are not permitted"),
    ),
    "invalid_yaml": (
        "bank: [unclosed\n  cache_dir: {\n",
        "config",
        ("cannot read vllm-safelora configuration", "expected ',' or ']'"),
    ),
    "adapter_dir_missing": (
        {"adapter_dirs": ["{work}/no-such-adapter-dir"]},
        "adapter sources",
        ("adapter directory", "does not exist", "create it"),
    ),
    "max_adapter_bytes_zero": (
        {"max_adapter_bytes": 0},
        "config",
        ("invalid vllm-safelora configuration", "max_adapter_bytes", "greater than 0"),
    ),
    "device_bogus": (
        {"device": "tpu"},
        "config",
        ("invalid vllm-safelora configuration", "device must be auto, cpu, cuda or cuda:N"),
    ),
    # authentication (tests/hardening/test_auth_startup.py)
    "auth_without_keys_file": (
        {"auth": {"enabled": True}},
        "config",
        ("auth.enabled needs auth.keys_file", "issue-key"),
    ),
    "auth_keys_file_missing": (
        {"auth": {"enabled": True, "keys_file": "{work}/no-keys.yaml"}},
        "auth",
        ("no-keys.yaml cannot be read", "issue-key --admin"),
    ),
    "upload_root_not_served": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml", "upload_root": "{work}/elsewhere"}},
        "config",
        ("auth.upload_root", "is not one of adapter_dirs"),
    ),
    "header_without_proxies": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml", "tenant_header": "X-Tenant"}},
        "config",
        ("auth.tenant_header needs auth.trusted_proxies",),
    ),
    "proxy_not_an_address": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml", "trusted_proxies": ["gw"]}},
        "config",
        ("'gw' is not an IP address or network",),
    ),
}


@pytest.fixture(scope="module")
def world(tiny_models, tiny_bank_dir, tmp_path_factory):
    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import make_tiny_models

    work = tmp_path_factory.mktemp("doctor")
    corrupt = work / "corrupt-bank"
    shutil.copytree(tiny_bank_dir, corrupt)
    data = bytearray((corrupt / "bank.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "bank.safetensors").write_bytes(bytes(data))
    others = make_tiny_models(work / "other_models", seed=1)
    other_bank = work / "other-bank"
    build_bank(str(others.base), str(others.aligned), other_bank, modules=["q_proj"], progress=None)
    (work / "a-regular-file").write_text("not a directory\n")
    (work / "adapters").mkdir()
    from vllm_safelora.serving.credentials import issue_key

    issue_key(work / "keys.yaml", "ops", "admin")
    return {
        "work": work,
        "corrupt_bank": corrupt,
        "other_bank": other_bank,
        "file": work / "a-regular-file",
        "bank": tiny_bank_dir,
        "model": str(tiny_models.aligned),
    }


def _fill(value, subst):
    if isinstance(value, str):
        return value.format(**subst)
    if isinstance(value, list):
        return [_fill(v, subst) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, subst) for k, v in value.items()}
    return value


def write_config(world, path: Path, edits) -> Path:
    if isinstance(edits, str):
        path.write_text(edits)
        return path
    doc = {
        "bank": str(world["bank"]),
        "adapter_dirs": [str(world["work"] / "adapters")],
        "cache_dir": str(path.parent / f"cache-{path.stem}"),
        "device": "cpu",
    }
    doc.update(_fill(edits or {}, {k: str(v) for k, v in world.items()}))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def env(monkeypatch):
    """A clean plugin environment; tests change what they check."""
    import os

    for key in [k for k in os.environ if k.startswith("VLLM_SAFELORA_") or k == "VLLM_USE_RUST_FRONTEND"]:
        monkeypatch.delenv(key)
    for key, value in GOOD_ENV.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def doctor(capsys, *args) -> tuple[int, dict]:
    code = main(["doctor", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "fail"}


def test_healthy_deployment(world, env, tmp_path, capsys):
    config = write_config(world, tmp_path / "ok.yaml", {})
    code, report = doctor(capsys, "--config", config, "--model", world["model"])
    assert code == 0 and report["ok"], failed(report)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    for name in (
        "config",
        "bank",
        "bank intact",
        "bank protects model",
        "policy (default)",
        "adapter sources",
        "cache",
        "vllm",
        "entry point safelora",
        "entry point safelora_routes",
        "VLLM_PLUGINS",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    ):
        assert statuses.get(name) == "ok", (name, statuses)
    # The table for people says the same.
    assert main(["doctor", "--config", str(config), "--model", world["model"]]) == 0
    assert "ready to serve" in capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(CASES))
def test_doctor_catches_what_the_server_refuses(world, env, tmp_path, capsys, case):
    edits, check, fragments = CASES[case]
    args = ["--model", world["model"]]
    if edits is not None:
        args += ["--config", write_config(world, tmp_path / f"{case}.yaml", edits)]
    code, report = doctor(capsys, *args)
    assert code == EXIT_PROBLEMS and not report["ok"]
    problems = failed(report)
    assert set(problems) == {check}, problems
    for fragment in fragments:
        assert fragment in problems[check], (fragment, problems[check])


def test_every_configuration_problem_is_listed_at_once(world, env, tmp_path, capsys):
    config = write_config(world, tmp_path / "bad.yaml", {"device": "tpu", "max_adapter_bytes": 0, "polcy": {}})
    code, report = doctor(capsys, "--config", config)
    assert code == EXIT_PROBLEMS
    details = [c["detail"] for c in report["checks"] if c["status"] == "fail"]
    assert len(details) == 3, details
    assert any("device" in d for d in details) and any("max_adapter_bytes" in d for d in details)
    assert any("polcy" in d for d in details)


def test_auth_and_vllms_own_key_are_refused_together(world, env, tmp_path, capsys):
    config = write_config(
        world, tmp_path / "both.yaml", {"auth": {"enabled": True, "keys_file": str(world["work"] / "keys.yaml")}}
    )
    code, report = doctor(capsys, "--config", config, "--model", world["model"])
    assert code == 0 and {c["name"]: c["status"] for c in report["checks"]}["auth"] == "ok", failed(report)
    env.setenv("VLLM_API_KEY", "shared-secret")
    code, report = doctor(capsys, "--config", config, "--model", world["model"])
    assert code == EXIT_PROBLEMS and "unset VLLM_API_KEY" in failed(report)["auth"]
    assert "shared-secret" not in json.dumps(report)


def test_policy_the_bank_cannot_serve(world, env, tmp_path, capsys):
    config = write_config(
        world, tmp_path / "salora.yaml", {"tenants": [{"match": "x/*", "policy": {"kind": "salora-style"}}]}
    )
    code, report = doctor(capsys, "--config", config, "--model", world["model"])
    assert code == EXIT_PROBLEMS
    assert "safety features" in failed(report)["policy tenants[0]"]


@pytest.mark.parametrize(
    "variable, value, check, says",
    [
        ("VLLM_PLUGINS", "some_other_plugin", "VLLM_PLUGINS", "does not name safelora"),
        ("VLLM_USE_RUST_FRONTEND", "1", "VLLM_USE_RUST_FRONTEND", "unset it"),
    ],
)
def test_environment_a_plugin_server_needs(world, env, tmp_path, capsys, variable, value, check, says):
    env.setenv(variable, value)
    code, report = doctor(capsys, "--config", write_config(world, tmp_path / "ok.yaml", {}))
    assert code == EXIT_PROBLEMS
    assert says in failed(report)[check]


def test_runtime_lora_updating_unset_is_a_warning(world, env, tmp_path, capsys):
    env.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    code, report = doctor(capsys, "--config", write_config(world, tmp_path / "ok.yaml", {}))
    assert code == 0
    warn = {c["name"]: c for c in report["checks"]}["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    assert warn["status"] == "warn" and "vllm-safelora serve" in warn["detail"]


def test_unqualified_vllm(world, env, tmp_path, capsys):
    from vllm_safelora.integration import qualify

    env.setattr(qualify, "installed_version", lambda: "0.31.0")
    code, report = doctor(capsys, "--config", write_config(world, tmp_path / "ok.yaml", {}))
    assert code == EXIT_PROBLEMS
    assert "qualified for vLLM" in failed(report)["vllm"]


def test_cache_over_budget_is_reported(world, env, tmp_path, capsys):
    config = write_config(world, tmp_path / "small.yaml", {"cache_max_bytes": 10})
    entry = tmp_path / "cache-small" / "entries" / "x"
    entry.mkdir(parents=True)
    (entry / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    code, report = doctor(capsys, "--config", config)
    cache = {c["name"]: c for c in report["checks"]}["cache"]
    assert cache["status"] == "warn" and "over budget" in cache["detail"]


@pytest.mark.parametrize("fstype, status", [("ext4", "ok"), ("nfs4", "warn"), ("fuse.sshfs", "warn")])
def test_doctor_says_whether_the_cache_file_system_keeps_ctime(
    world, env, tmp_path, capsys, monkeypatch, fstype, status
):
    from vllm_safelora import fsutil

    config = write_config(world, tmp_path / "fs.yaml", {})
    monkeypatch.setattr(fsutil, "filesystem_type", lambda path, mountinfo="": fstype)
    _, report = doctor(capsys, "--config", config)
    check = {c["name"]: c for c in report["checks"]}["cache identity"]
    assert check["status"] == status and fstype in check["detail"]
