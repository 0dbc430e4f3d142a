"""API keys and who may use which adapter, in-process: the keys file, its re-reading, the CLI.

The live behaviour (every route, a foreign adapter answered as missing) is in
tests/hardening/test_auth.py.
"""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from vllm_safelora.cli import main
from vllm_safelora.errors import ConfigError
from vllm_safelora.serving.access import OPEN, may_use, owns
from vllm_safelora.serving.credentials import Identity, KeyStore, issue_key, revoke_keys


def test_a_key_proves_its_tenant_and_the_file_holds_no_key(tmp_path):
    path = tmp_path / "keys.yaml"
    acme = issue_key(path, "acme", "tenant")
    ops = issue_key(path, "ops", "admin")
    store = KeyStore(path)
    assert store.identify(acme) == Identity("tenant", "acme", "key")
    assert store.identify(ops).admin
    text = path.read_text()
    assert acme not in text and acme[16:] not in text and ops[16:] not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert yaml.safe_load(text)["hash"] == "hmac-sha256"


@pytest.mark.parametrize("variant", ["last-char", "other-id", "no-prefix", "empty", "long", "unicode", "spaces"])
def test_anything_but_the_exact_key_is_refused(tmp_path, variant):
    path = tmp_path / "keys.yaml"
    key = issue_key(path, "acme", "tenant")
    other = issue_key(path, "globex", "tenant")
    wrong = {
        "last-char": key[:-1] + ("A" if key[-1] != "A" else "B"),
        "other-id": other[:16] + key[16:],
        "no-prefix": key[3:],
        "empty": "",
        "long": key + "x" * 10_000,
        "unicode": key[:-1] + "\u00e9",
        "spaces": f" {key}",
    }[variant]
    assert KeyStore(path).identify(wrong) is None


def test_the_file_is_re_read_when_it_changes_and_fails_closed_when_broken(tmp_path):
    path = tmp_path / "keys.yaml"
    acme = issue_key(path, "acme", "tenant")
    store = KeyStore(path)
    assert store.identify(acme) is not None
    late = issue_key(path, "late", "tenant")
    assert store.identify(late).name == "late"
    assert revoke_keys(path, "acme") == 1
    assert store.identify(acme) is None and store.identify(late) is not None
    path.write_text("format: nonsense\n")
    assert store.identify(late) is None  # an invalid file refuses every key until fixed
    path.unlink()
    assert store.identify(late) is None


def test_start_up_refuses_a_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyStore(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("format: vllm-safelora-keys/1\nhash: md5\nkeys: []\n")
    with pytest.raises(ConfigError, match="hmac-sha256"):
        KeyStore(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "acme\n", "hub:org"])
def test_names_that_cannot_be_a_namespace_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="cannot name"):
        issue_key(tmp_path / "keys.yaml", name, "tenant")


def test_one_name_is_a_tenant_or_an_operator_not_both(tmp_path):
    issue_key(tmp_path / "keys.yaml", "acme", "tenant")
    with pytest.raises(ConfigError, match="already a tenant"):
        issue_key(tmp_path / "keys.yaml", "acme", "admin")


def test_cli_issue_and_revoke(tmp_path, capsys, monkeypatch):
    config = tmp_path / "plugin.yaml"
    keys = tmp_path / "keys.yaml"
    config.write_text(yaml.safe_dump({"bank": "/nowhere", "auth": {"enabled": True, "keys_file": str(keys)}}))
    assert main(["issue-key", "acme", "--config", str(config)]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert KeyStore(keys).identify(key).name == "acme" and key not in out.err
    assert main(["issue-key", "--admin", "ops", "--keys-file", str(keys)]) == 0
    capsys.readouterr()
    assert main(["revoke-key", "acme", "--keys-file", str(keys)]) == 0
    assert KeyStore(keys).identify(key) is None
    assert main(["revoke-key", "acme", "--keys-file", str(keys)]) == 1
    monkeypatch.delenv("VLLM_SAFELORA_CONFIG", raising=False)
    assert main(["issue-key", "acme"]) == 2
    assert "--keys-file" in capsys.readouterr().err


def test_who_may_use_what():
    acme = Identity("tenant", "acme", "key")
    shared = ["public/*"]
    assert may_use(acme, "acme/bot", shared) and may_use(acme, "acme", shared) and may_use(acme, "public/x", shared)
    for name in ("globex/bot", "acmecorp/bot", "hub:acme/x", "public", "", "Acme/bot"):
        assert not may_use(acme, name, shared), name
    assert may_use(OPEN, "globex/bot", shared) and may_use(Identity("admin", "ops", "key"), "globex/bot", [])
    assert may_use(acme, "s3:acme/bot", [], ("s3:",)) and not may_use(acme, "s3:globex/bot", [], ("s3:",))
    assert not may_use(acme, "s3:acme/bot", [])  # without the prefix known, "s3:acme" is no tenant
    assert owns(acme, "acme/bot") and not owns(acme, "acme") and not owns(acme, "public/x")


def test_routes_are_closed_to_tenants_unless_listed():
    from vllm_safelora.integration.auth import tenant_may_call

    for method, path in (
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/safelora/v1/adapters"),
        ("PUT", "/safelora/v1/adapters/acme/bot"),
        ("DELETE", "/safelora/v1/adapters/acme/bot"),
        ("GET", "/health"),
    ):
        assert tenant_may_call(method, path), (method, path)
    for method, path in (
        ("GET", "/safelora/v1/status"),
        ("GET", "/metrics"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/v1/responses"),
        ("POST", "/tokenize"),
        ("GET", "/v1/models/acme"),
        ("DELETE", "/safelora/v1/adapters"),
        ("POST", "/collective_rpc"),
        ("PUT", "/v1/completions"),
        ("GET", "/v1/completions/x"),
    ):
        assert not tenant_may_call(method, path), (method, path)
