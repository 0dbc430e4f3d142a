"""The fleet-shared tier of projected entries against a real S3 server process (moto over HTTP),
through two services with their own local caches (no vLLM; the live two-replica case is in
tests/e2e/test_s3.py): the second downloads instead of projecting, and an entry that is
unsigned, signed with another key, bound to another key, or altered is ignored, counted and
rebuilt locally, never served."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY
from support.s3 import running_store

from vllm_safelora.adapters import WEIGHTS_FILE
from vllm_safelora.cache import PatchedAdapterCache
from vllm_safelora.cache.shared_tier import SHARED_MANIFEST
from vllm_safelora.config import SafeLoRASettings
from vllm_safelora.errors import ConfigError
from vllm_safelora.serving.service import SafeLoRAService
from vllm_safelora.serving.startup import build_shared_tier, build_sources

BUCKET = "fleet"


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


pytestmark = pytest.mark.usefixtures("aws_credentials")


def _projections() -> float:
    return _metric("safelora_projections_total", policy="safelora")


def _tier(result: str) -> float:
    return _metric("safelora_shared_tier_total", result=result)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_store(tmp_path_factory.mktemp("s3"), BUCKET) as s:
        yield s


def _key_file(path, secret: bytes):
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


def _replica(tmp_path, name, tiny_bank, adapters, store, secret=b"f" * 40, **extra) -> SafeLoRAService:
    settings = SafeLoRASettings(
        **extra,
        bank=tiny_bank.path,
        adapter_dirs=[adapters],
        cache_dir=tmp_path / f"cache-{name}",
        device="cpu",
        shared_cache={
            "enabled": True,
            "uri": f"s3://{BUCKET}/entries/",
            "endpoint_url": store.endpoint,
            "mac_key_file": str(_key_file(tmp_path / f"key-{name}", secret)),
            "read_timeout_s": 2,
            "retries": 0,
        },
    )
    cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes)
    return SafeLoRAService(
        settings, tiny_bank, build_sources(settings), cache, max_rank=8, shared_tier=build_shared_tier(settings)
    )


@pytest.fixture()
def adapters(tmp_path, tiny_adapter_factory):
    root = tmp_path / "adapters"
    for i, tenant in enumerate(("acme", "unsigned", "otherkey", "misbound", "altered", "othercfg")):
        tiny_adapter_factory.copy_to(root / tenant / "bot", "random", seed=60 + i)
    return root


def _entry_objects(store, digest):
    c = store.client()
    manifest = json.loads(c.get_object(Bucket=BUCKET, Key=f"entries/{digest}/{SHARED_MANIFEST}")["Body"].read())
    return c, manifest


def test_second_replica_downloads_instead_of_projecting(tmp_path, tiny_bank, adapters, store):
    a = _replica(tmp_path, "a", tiny_bank, adapters, store)
    b = _replica(tmp_path, "b", tiny_bank, adapters, store)
    uploaded, hits, projections = _tier("uploaded"), _tier("hit"), _projections()
    first = a.prepare("acme/bot")
    assert _projections() == projections + 1 and _tier("uploaded") == uploaded + 1
    second = b.prepare("acme/bot")
    assert _projections() == projections + 1, "the second replica projected although the tier had the entry"
    assert _tier("hit") == hits + 1
    assert not second.cache_hit and second.digest == first.digest
    for f in ("adapter_config.json", WEIGHTS_FILE):
        assert (second.path / f).read_bytes() == (first.path / f).read_bytes()
    assert b.cache.entry_at(second.path) is not None, "a tier entry enters the local cache sealed and verified"


def _reupload(store, digest, manifest):
    store.client().put_object(
        Bucket=BUCKET, Key=f"entries/{digest}/{SHARED_MANIFEST}", Body=json.dumps(manifest).encode()
    )


@pytest.mark.parametrize(
    "tenant, result",
    [
        ("unsigned", "unsigned"),
        ("otherkey", "bad_mac"),
        ("misbound", "mis_bound"),
        ("altered", "bad_file"),
        ("othercfg", "mis_bound"),  # signed by a replica whose settings outside the cache key differ
    ],
)
def test_untrusted_tier_entries_are_ignored_and_rebuilt(tmp_path, tiny_bank, adapters, store, tenant, result):
    name = f"{tenant}/bot"
    a = _replica(
        tmp_path,
        "a",
        tiny_bank,
        adapters,
        store,
        secret=b"another fleet's key, 40 bytes long......" if tenant == "otherkey" else b"f" * 40,
        **({"require_base_model_match": False} if tenant == "othercfg" else {}),
    )
    honest = a.prepare(name)
    digest = honest.digest
    c, stored = _entry_objects(store, digest)
    if tenant == "unsigned":
        _reupload(store, digest, {"manifest": stored["manifest"]})
    elif tenant == "misbound":
        # a genuinely signed manifest, of another adapter's entry, placed under this key
        donor = a.prepare("acme/bot").digest
        c.copy_object(
            Bucket=BUCKET,
            Key=f"entries/{digest}/{SHARED_MANIFEST}",
            CopySource={"Bucket": BUCKET, "Key": f"entries/{donor}/{SHARED_MANIFEST}"},
        )
    elif tenant == "altered":
        key = f"entries/{digest}/{WEIGHTS_FILE}"
        body = bytearray(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[-1] ^= 1
        c.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    b = _replica(tmp_path, "b", tiny_bank, adapters, store)
    ignored, projections = _tier(result), _projections()
    rebuilt = b.prepare(name)
    assert _tier(result) == ignored + 1
    assert _projections() == projections + 1, "an untrusted tier entry must be rebuilt locally"
    assert rebuilt.digest == digest
    for f in ("adapter_config.json", WEIGHTS_FILE):
        assert (rebuilt.path / f).read_bytes() == (honest.path / f).read_bytes()


@pytest.mark.parametrize(
    "cfg, why",
    [
        ({"mac_key_file": None}, "mac_key_file is not set"),
        ({"mac_key_file": "/nonexistent/key"}, "cannot be read"),
        ({"mac_key_file": "SHORT"}, "at least 32"),
        ({"uri": None}, "uri is not set"),
        ({"uri": "s3://x"}, "bucket"),
    ],
)
def test_misconfigured_tier_refuses_to_start(tmp_path, tiny_bank, cfg, why):
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    cfg = {k: (str(short) if v == "SHORT" else v) for k, v in cfg.items()}
    settings = SafeLoRASettings(
        bank=tiny_bank.path,
        cache_dir=tmp_path / "cache",
        device="cpu",
        shared_cache={"enabled": True, "uri": "s3://fleet/entries/", "mac_key_file": str(tmp_path / "k"), **cfg},
    )
    (tmp_path / "k").write_bytes(b"k" * 40)
    with pytest.raises(ConfigError, match=why):
        build_shared_tier(settings)
