"""The S3 adapter source against a real S3 server process (moto over HTTP on loopback), through the
service pipeline without vLLM: names checked before any request, sizes bounded by the HEAD, one
pinned version, a store that is down or slow -> SourceUnavailable (HTTP 503), never a stall.
The same cases through a live vLLM server: tests/e2e/test_s3.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from support.s3 import running_store

from vllm_safelora.adapters import ReadLimits
from vllm_safelora.cache import PatchedAdapterCache
from vllm_safelora.config import SafeLoRASettings
from vllm_safelora.errors import AdapterRefused, ConfigError, RefusalReason, SourceUnavailable
from vllm_safelora.serving.service import SafeLoRAService
from vllm_safelora.serving.startup import build_sources

BUCKET = "adapters"


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


pytestmark = pytest.mark.usefixtures("aws_credentials")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_store(tmp_path_factory.mktemp("s3"), BUCKET) as s:
        yield s


def _service(tmp_path, tiny_bank, store, limits=None, **s3) -> SafeLoRAService:
    settings = SafeLoRASettings(
        bank=tiny_bank.path,
        cache_dir=tmp_path / "cache",
        device="cpu",
        s3={
            "enabled": True,
            "uri": f"s3://{BUCKET}/tenants/",
            "endpoint_url": store.endpoint,
            "read_timeout_s": 1.0,
            "connect_timeout_s": 1.0,
            "fetch_timeout_s": 5.0,
            "retries": 1,
            **s3,
        },
    )
    cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes)
    return SafeLoRAService(settings, tiny_bank, build_sources(settings, limits), cache, max_rank=8, limits=limits)


def test_prepares_a_projected_adapter_from_the_store(tmp_path, tiny_bank, store, tiny_adapter_factory):
    src = tiny_adapter_factory("random", seed=41)
    store.upload_dir(BUCKET, "tenants/acme/bot", src)
    svc = _service(tmp_path, tiny_bank, store)
    fetched = _metric("safelora_source_fetch_bytes_total", source="s3")
    prepared = svc.prepare("s3:acme/bot")
    assert prepared.report.summary.outcome == "modified"
    assert prepared.location.identity == "s3:acme/bot"
    size = sum(
        p.stat().st_size for p in src.iterdir() if p.name in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert _metric("safelora_source_fetch_bytes_total", source="s3") - fetched == size
    # the private download directory is gone once the adapter was read
    assert not list(Path(svc.sources[0].staging).glob(f"safelora-s3.{__import__('os').getpid()}.*"))


@pytest.mark.parametrize(
    "name, why",
    [
        ("s3:../etc/x", ".."),
        ("s3:acme/%2e%2e", "%"),
        ("s3:acme/a\nb", "control"),
        ("s3:acme", "tenant"),
        ("s3:a/b/c", "more than one"),
    ],
)
def test_illegal_names_are_refused_before_any_request(tmp_path, tiny_bank, store, name, why):
    svc = _service(tmp_path, tiny_bank, store, endpoint_url="http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(AdapterRefused) as info:
        svc.prepare(name)
    assert info.value.reason is RefusalReason.INVALID_NAME and why in str(info.value)


def test_oversized_weights_cost_a_head_not_a_download(tmp_path, tiny_bank, store, tiny_adapter_factory):
    store.upload_dir(BUCKET, "tenants/acme/huge", tiny_adapter_factory("random", seed=42))
    svc = _service(tmp_path, tiny_bank, store, limits=ReadLimits(max_bytes=1000, max_rank=8))
    fetched = _metric("safelora_source_fetch_bytes_total", source="s3")
    with pytest.raises(AdapterRefused) as info:
        svc.prepare("s3:acme/huge")
    assert info.value.reason is RefusalReason.TOO_LARGE and "limit is 1000" in str(info.value)
    assert _metric("safelora_source_fetch_bytes_total", source="s3") == fetched


def test_missing_weights_and_pickle_only(tmp_path, tiny_bank, store, tiny_adapter_factory):
    src = tiny_adapter_factory("random", seed=43)
    store.upload_dir(BUCKET, "tenants/acme/noweights", src, files={"adapter_config.json"})
    store.upload_dir(BUCKET, "tenants/acme/pickled", src, files={"adapter_config.json"})
    store.client().put_object(Bucket=BUCKET, Key="tenants/acme/pickled/adapter_model.bin", Body=b"\x80\x04not read")
    svc = _service(tmp_path, tiny_bank, store)
    with pytest.raises(AdapterRefused) as info:
        svc.prepare("s3:acme/noweights")
    assert info.value.reason is RefusalReason.MISSING_TENSOR
    with pytest.raises(AdapterRefused) as info:
        svc.prepare("s3:acme/pickled")
    assert info.value.reason is RefusalReason.PICKLE_ONLY
    with pytest.raises(AdapterRefused) as info:
        svc.prepare("s3:acme/nothing-here")
    assert info.value.reason is RefusalReason.NOT_FOUND


def test_rewritten_while_downloaded_is_refused_never_mixed(tmp_path, tiny_bank, store, tiny_adapter_factory):
    a, b = tiny_adapter_factory("random", seed=44), tiny_adapter_factory("random", seed=45)
    store.upload_dir(BUCKET, "tenants/acme/moving", a)
    store.set_faults(
        {
            "contains": "tenants/acme/moving/adapter_model.safetensors",
            "method": "GET",
            "rewrite_with": [str(b / "adapter_model.safetensors"), str(a / "adapter_model.safetensors")],
        }
    )
    try:
        svc = _service(tmp_path, tiny_bank, store)
        before = _metric("safelora_source_fetch_failures_total", source="s3", reason="changed")
        with pytest.raises(AdapterRefused) as info:
            svc.prepare("s3:acme/moving")
        assert info.value.reason is RefusalReason.CHANGED_WHILE_READING, info.value
        assert "2 attempts" in str(info.value)
        assert _metric("safelora_source_fetch_failures_total", source="s3", reason="changed") == before + 1
    finally:
        store.set_faults()


def test_slow_store_is_a_503_within_the_deadline(tmp_path, tiny_bank, store, tiny_adapter_factory):
    store.upload_dir(BUCKET, "tenants/slow/bot", tiny_adapter_factory("random", seed=46))
    store.set_faults({"contains": "tenants/slow/", "delay_s": 3})
    try:
        svc = _service(tmp_path, tiny_bank, store)
        t0 = time.monotonic()
        with pytest.raises(SourceUnavailable) as info:
            svc.prepare("s3:slow/bot")
        assert info.value.reason == "timeout" and info.value.retry_after_s > 0
        assert time.monotonic() - t0 < 8
    finally:
        store.set_faults()


def test_store_down_is_a_503(tmp_path, tiny_bank, store):
    svc = _service(tmp_path, tiny_bank, store, endpoint_url="http://127.0.0.1:9")
    assert svc.retry_after_s() < 4
    with pytest.raises(SourceUnavailable) as info:
        svc.prepare("s3:acme/bot")
    assert info.value.reason == "unreachable"
    # 503s now tell clients the store's Retry-After (s3.retry_after_s, 5 s), not the throttle's 2 s
    assert 4 < svc.retry_after_s() <= 5


@pytest.mark.parametrize(
    "s3, why",
    [
        ({"uri": None}, "s3.uri is not set"),
        ({"uri": "https://x/y"}, "s3://"),
        ({"uri": "s3://A_b/x"}, "bucket"),
        ({"uri": "s3://bkt/../x"}, "prefix"),
        ({"endpoint_url": "ftp://x"}, "endpoint_url"),
        ({"prefix": ""}, "prefix"),
        ({"prefix": "hub:"}, "overlap"),
    ],
)
def test_misconfigured_store_refuses_to_start(tmp_path, tiny_bank, s3, why):
    settings = SafeLoRASettings(
        bank=tiny_bank.path,
        cache_dir=tmp_path / "cache",
        device="cpu",
        hub={"enabled": True},
        s3={"enabled": True, "uri": "s3://bkt/p/", **s3},
    )
    with pytest.raises(ConfigError, match=why):
        build_sources(settings)
