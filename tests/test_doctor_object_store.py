"""``vllm-safelora doctor`` checks the S3 adapter store and the fleet-shared tier against a real S3
server process (moto over HTTP on loopback): reachable, credentials accepted, bucket readable,
and never prints a secret (neither the AWS secret key nor the fleet MAC key)."""

from __future__ import annotations

import json

import pytest
import yaml
from support.s3 import SECRET_KEY, S3TestStore, aws_env

from vllm_safelora.cli import main

FLEET_SECRET = b"fleet-mac-secret-" + b"z" * 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = S3TestStore(tmp_path_factory.mktemp("s3")).start()
    s.client().create_bucket(Bucket="adapters")
    yield s
    s.stop()


@pytest.fixture
def env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith(("VLLM_SAFELORA_", "AWS_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("VLLM_PLUGINS", "safelora,safelora_routes")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup on a test machine
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return monkeypatch


def _doctor(capsys, tmp_path, tiny_bank_dir, **doc) -> tuple[dict, str]:
    key = tmp_path / "fleet.key"
    key.write_bytes(FLEET_SECRET)
    key.chmod(0o600)
    base = {"bank": str(tiny_bank_dir), "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    for section in ("s3", "shared_cache"):
        if section in doc:
            doc[section] = {k: (str(key) if v == "KEY" else v) for k, v in doc[section].items()}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**base, **doc}))
    main(["doctor", "--config", str(config), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    return {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}, out


def test_reachable_store_and_tier_are_ok_and_no_secret_is_printed(env, store, tmp_path, tiny_bank_dir, capsys):
    for k, v in aws_env().items():
        env.setenv(k, v)
    checks, out = _doctor(
        capsys,
        tmp_path,
        tiny_bank_dir,
        s3={"enabled": True, "uri": "s3://adapters/tenants/", "endpoint_url": store.endpoint},
        shared_cache={
            "enabled": True,
            "uri": "s3://adapters/fleet/",
            "endpoint_url": store.endpoint,
            "mac_key_file": "KEY",
        },
    )
    assert checks["s3 adapter store"][0] == "ok", checks
    assert "bucket readable" in checks["s3 adapter store"][1]
    assert checks["shared cache tier"][0] == "ok", checks
    assert SECRET_KEY not in out and FLEET_SECRET.decode() not in out


@pytest.mark.parametrize(
    "case, creds, uri, says",
    [
        ("no credentials", False, "s3://adapters/tenants/", "credentials"),
        ("bucket missing", True, "s3://no-such-bucket/tenants/", "no_such_bucket"),
        ("store down", True, "s3://adapters/tenants/", "unreachable"),
    ],
)
def test_store_problems_fail_the_check(env, store, tmp_path, tiny_bank_dir, capsys, case, creds, uri, says):
    if creds:
        for k, v in aws_env().items():
            env.setenv(k, v)
    endpoint = "http://127.0.0.1:9" if case == "store down" else store.endpoint
    checks, out = _doctor(
        capsys,
        tmp_path,
        tiny_bank_dir,
        s3={"enabled": True, "uri": uri, "endpoint_url": endpoint, "retries": 0, "connect_timeout_s": 1},
    )
    status, detail = checks["s3 adapter store"]
    assert status == "fail" and says in detail, checks
    assert SECRET_KEY not in out


def test_tier_without_a_key_file_fails(env, store, tmp_path, tiny_bank_dir, capsys):
    checks, _ = _doctor(
        capsys,
        tmp_path,
        tiny_bank_dir,
        shared_cache={
            "enabled": True,
            "uri": "s3://adapters/fleet/",
            "endpoint_url": store.endpoint,
            "mac_key_file": str(tmp_path / "missing.key"),
        },
    )
    assert checks["shared cache tier"][0] == "fail" and "cannot be read" in checks["shared cache tier"][1]
