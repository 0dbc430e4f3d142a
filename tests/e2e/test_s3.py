"""Adapters from object storage, projected once per fleet: two live plugin servers (replicas) reading
adapters from a real S3 server process on loopback (moto's S3 over HTTP, ``support/s3_server.py``)
and sharing the fleet tier of projected entries in the same store.

Replica ``a`` serves every case; replica ``b`` (its own cache directory) shows the tier: it serves
what ``a`` built without projecting, and rebuilds an entry someone altered or signed with another
key. Every hostile case gets a 4xx/503 naming its reason while other tenants keep being served.
The two servers are started once for the module (at the same time) and shared by its tests.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from support.fleet import FLEET_BUCKET, TENANTS_BUCKET, open_fleet
from support.s3 import SECRET_KEY
from support.server import write_config

pytestmark = pytest.mark.e2e

LOGPROB_TOL = 1e-3
MAX_ADAPTER_BYTES = 1 << 20
# name under s3://adapters/tenants/ -> adapter seed (distinct contents: no case is another's cache hit)
S3_ADAPTERS = {
    "acme/bot": 70,
    "acme/loaded": 71,
    "acme/moving": 72,
    "acme/late": 73,
    "acme/tampered": 74,
    "acme/otherkey": 75,
    "slow/bot": 76,
}
LOCAL_TENANT = "globex/random"  # the other tenant, from local disk


def _ids(e2e_world):
    return e2e_world.token_ids


@pytest.fixture(scope="module")
def fleet(e2e_world, tiny_adapter_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_fleet")
    s3fleet = open_fleet(root)
    store = s3fleet.store
    sources = {name: tiny_adapter_factory("random", seed=seed) for name, seed in S3_ADAPTERS.items()}

    def seed_store():
        s3fleet.create_buckets()
        c = store.client()
        for name, src in sources.items():
            s3fleet.upload_adapter(name, src)
        big = sources["acme/bot"]
        s3fleet.upload_adapter("acme/huge", big, files={"adapter_config.json"})
        c.put_object(
            Bucket=TENANTS_BUCKET,
            Key="tenants/acme/huge/adapter_model.safetensors",
            Body=b"\0" * (2 * MAX_ADAPTER_BYTES),
        )
        s3fleet.upload_adapter("acme/noweights", big, files={"adapter_config.json"})
        s3fleet.upload_adapter("acme/pickled", big, files={"adapter_config.json"})
        c.put_object(Bucket=TENANTS_BUCKET, Key="tenants/acme/pickled/adapter_model.bin", Body=b"\x80\x04never read")

    try:
        seed_store()
        # The same content as an s3 adapter, on local disk: first-request latency from each.
        local_root = root / "local"
        for i in range(3):
            tiny_adapter_factory.copy_to(local_root / "lat" / f"local{i}", "random", seed=90 + i)
            s3fleet.upload_adapter(f"lat/remote{i}", tiny_adapter_factory("random", seed=95 + i))
        # Both replicas start at once (their start-ups overlap).
        a, b = s3fleet.start_replicas(
            e2e_world,
            ("a", "b"),
            adapter_dirs=[str(e2e_world.adapter_root), str(local_root)],
            max_adapter_bytes=MAX_ADAPTER_BYTES,
        )
        yield type(
            "Fleet",
            (),
            dict(
                store=store,
                a=a,
                b=b,
                caches=s3fleet.caches,
                sources=sources,
                seed_store=seed_store,
                root=root,
                key_file=s3fleet.key_file,
            ),
        )
    finally:
        s3fleet.stop()


def _projections(server) -> float:
    return server.metrics().projections()


def _tier(server, result) -> float:
    return server.metrics().value("safelora_shared_tier_total", result=result)


def _served_ok(server, e2e, e2e_world, name):
    out = e2e.complete(server, name, _ids(e2e_world), max_tokens=4, logprobs=5)
    assert len(out.token_ids) == 4
    return out


def _error(r) -> str:
    try:
        return json.dumps(r.json())
    except ValueError:
        return r.text


# --------------------------------------------------------------------------- served


def test_resolver_serves_the_projected_s3_adapter(fleet, e2e_world, peft_reference, e2e):
    name = "s3:acme/bot"
    served = e2e.complete(fleet.a, name, _ids(e2e_world), max_tokens=8, logprobs=5)
    projected = e2e_world.projected("s3-acme-bot", src=fleet.sources["acme/bot"])
    e2e.assert_matches_reference(served.first_top, peft_reference.next_token_logprobs(projected), LOGPROB_TOL, "s3")
    assert e2e.max_logprob_gap(served.first_top, peft_reference.next_token_logprobs(fleet.sources["acme/bot"])) > 0.05
    audit = fleet.a.get(f"/safelora/v1/adapters/{name}").json()
    assert audit["summary"]["outcome"] == "modified"
    m = fleet.a.metrics()
    assert m.value("safelora_source_fetch_bytes_total", source="s3") > 0
    assert m.value("safelora_source_fetch_seconds_count", source="s3") >= 1


def test_load_endpoint_serves_an_s3_adapter_by_uri(fleet, e2e_world, peft_reference, e2e):
    name = "s3:acme/loaded"
    r = fleet.a.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"s3://{TENANTS_BUCKET}/tenants/acme/loaded/"}
    )
    assert r.status_code == 200, r.text
    served = e2e.complete(fleet.a, name, _ids(e2e_world), max_tokens=8, logprobs=5)
    projected = e2e_world.projected("s3-acme-loaded", src=fleet.sources["acme/loaded"])
    e2e.assert_matches_reference(served.first_top, peft_reference.next_token_logprobs(projected), LOGPROB_TOL, "load")


# --------------------------------------------------------------------------- hostile cases


@pytest.mark.parametrize(
    "name, status, reason, why",
    [
        ("s3:acme/huge", 413, "too_large", "limit is"),
        ("s3:acme/noweights", 400, "missing_tensor", "adapter_model.safetensors is missing"),
        ("s3:acme/pickled", 400, "pickle_only", "never downloaded"),
        ("s3:../etc", 400, "invalid_name", ".."),
        ("s3:acme/%2e%2e", 400, "invalid_name", "%"),
        ("s3:acme/x/y", 400, "invalid_name", "more than one"),
    ],
)
def test_hostile_adapter_is_refused_naming_why(fleet, e2e_world, e2e, name, status, reason, why):
    _served_ok(fleet.a, e2e, e2e_world, LOCAL_TENANT)
    fetched = fleet.a.metrics().value("safelora_source_fetch_bytes_total", source="s3")
    r = fleet.a.complete(name)
    assert r.status_code == status and reason in r.text and why in r.text, _error(r)
    assert fleet.a.metrics().value("safelora_source_fetch_bytes_total", source="s3") == fetched, (
        "a refused adapter was downloaded"
    )
    _served_ok(fleet.a, e2e, e2e_world, LOCAL_TENANT)


def test_object_rewritten_during_download_is_refused(fleet, e2e_world, e2e):
    other = fleet.sources["acme/late"]
    own = fleet.sources["acme/moving"]
    fleet.store.set_faults(
        {
            "contains": "tenants/acme/moving/adapter_model.safetensors",
            "method": "GET",
            "rewrite_with": [str(other / "adapter_model.safetensors"), str(own / "adapter_model.safetensors")],
        }
    )
    try:
        r = fleet.a.complete("s3:acme/moving")
    finally:
        fleet.store.set_faults()
    assert r.status_code == 400 and "changed_while_reading" in r.text and "rewritten" in r.text, _error(r)
    assert fleet.a.metrics().value("safelora_source_fetch_failures_total", source="s3", reason="changed") >= 1
    _served_ok(fleet.a, e2e, e2e_world, "s3:acme/bot")


# --------------------------------------------------------------------------- the fleet tier


def test_second_replica_serves_from_the_tier_without_projecting(fleet, e2e_world, e2e):
    name = "s3:acme/bot"
    on_a = e2e.complete(fleet.a, name, _ids(e2e_world), max_tokens=8, logprobs=5)
    assert _projections(fleet.b) == 0
    on_b = e2e.complete(fleet.b, name, _ids(e2e_world), max_tokens=8, logprobs=5)
    assert _projections(fleet.b) == 0, "replica b projected an adapter the tier holds"
    assert _tier(fleet.b, "hit") == 1
    assert on_a.token_ids == on_b.token_ids
    assert max(abs(on_a.first_top[t] - on_b.first_top[t]) for t in on_a.first_top) < 1e-5
    entry_a = fleet.a.get(f"/safelora/v1/adapters/{name}").json()["cache_entry"]
    entry_b = fleet.b.get(f"/safelora/v1/adapters/{name}").json()["cache_entry"]
    assert entry_a == entry_b
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (fleet.caches["a"] / "entries" / entry_a / f).read_bytes() == (
            fleet.caches["b"] / "entries" / entry_b / f
        ).read_bytes()
    print(
        f"\n[s3] projections: replica a {_projections(fleet.a):g}, replica b {_projections(fleet.b):g} "
        f"(tier hits on b: {_tier(fleet.b, 'hit'):g})"
    )


def test_altered_or_foreign_tier_entries_are_rebuilt_not_served(fleet, e2e_world, e2e):
    from vllm_safelora.cache.shared_tier import SHARED_MANIFEST, SharedTier

    c = fleet.store.client()
    honest = {}
    for name in ("s3:acme/tampered", "s3:acme/otherkey"):
        honest[name] = e2e.complete(fleet.a, name, _ids(e2e_world), max_tokens=8, logprobs=5)
    digest = {n: fleet.a.get(f"/safelora/v1/adapters/{n}").json()["cache_entry"] for n in honest}
    # one entry's weights altered in the tier ...
    key = f"entries/{digest['s3:acme/tampered']}/adapter_model.safetensors"
    body = bytearray(c.get_object(Bucket=FLEET_BUCKET, Key=key)["Body"].read())
    body[-1] ^= 1
    c.put_object(Bucket=FLEET_BUCKET, Key=key, Body=bytes(body))
    # ... and another's manifest signed again with a key that is not the fleet's
    mkey = f"entries/{digest['s3:acme/otherkey']}/{SHARED_MANIFEST}"
    stored = json.loads(c.get_object(Bucket=FLEET_BUCKET, Key=mkey)["Body"].read())
    forger = SharedTier(store=None, mac_key=b"not-the-fleet-key-" + b"x" * 40, context={}, max_entry_bytes=0)
    stored["mac"] = forger._mac(stored["manifest"])
    c.put_object(Bucket=FLEET_BUCKET, Key=mkey, Body=json.dumps(stored).encode())

    projections = _projections(fleet.b)
    for name, result in (("s3:acme/tampered", "bad_file"), ("s3:acme/otherkey", "bad_mac")):
        before = _tier(fleet.b, result)
        on_b = e2e.complete(fleet.b, name, _ids(e2e_world), max_tokens=8, logprobs=5)
        assert _tier(fleet.b, result) == before + 1, result
        assert on_b.token_ids == honest[name].token_ids
        assert max(abs(on_b.first_top[t] - honest[name].first_top[t]) for t in on_b.first_top) < 1e-5
    assert _projections(fleet.b) == projections + 2, "untrusted tier entries must be rebuilt locally"
    log = fleet.b.log_text()
    assert "IGNORED (bad_file" in log and "IGNORED (bad_mac" in log


# --------------------------------------------------------------------------- latency (for the report)


def test_first_request_latency_s3_vs_local_disk(fleet, e2e_world, e2e):
    def first(name):
        t0 = time.perf_counter()
        _served_ok(fleet.a, e2e, e2e_world, name)
        return time.perf_counter() - t0

    def fetch_seconds():
        m = fleet.a.metrics()
        return (
            m.value("safelora_source_fetch_seconds_sum", source="s3"),
            m.value("safelora_source_fetch_seconds_count", source="s3"),
        )

    local = [first(f"lat/local{i}") for i in range(3)]
    (s0, n0) = fetch_seconds()
    remote = [first(f"s3:lat/remote{i}") for i in range(3)]
    (s1, n1) = fetch_seconds()
    again = [first(f"s3:lat/remote{i}") for i in range(3)]
    # Both first requests include the upload of the new entry to the fleet tier.
    print(
        f"\n[s3] first request (resolve + fetch + project + tier upload + load + 4 tokens), median of 3: local disk "
        f"{statistics.median(local) * 1e3:.0f} ms, S3 {statistics.median(remote) * 1e3:.0f} ms (of which the "
        f"download, mean: {(s1 - s0) / max(1, n1 - n0) * 1e3:.0f} ms); prepared S3 adapter again "
        f"{statistics.median(again) * 1e3:.0f} ms"
    )
    assert statistics.median(again) < statistics.median(remote)


# --------------------------------------------------------------------------- a store that is slow, then down


def test_slow_store_is_a_503_and_never_stalls_other_tenants(fleet, e2e_world, e2e):
    fleet.store.set_faults({"contains": "tenants/slow/", "delay_s": 30})
    result = {}

    def slow():
        t0 = time.monotonic()
        result["r"] = fleet.a.complete("s3:slow/bot")
        result["s"] = time.monotonic() - t0

    try:
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        _served_ok(fleet.a, e2e, e2e_world, "s3:acme/bot")
        _served_ok(fleet.a, e2e, e2e_world, "globex/ortho")  # a new local adapter, prepared meanwhile
        others = time.monotonic() - t0
        assert t.is_alive(), "the slow store answered before the other tenants were served"
        t.join(60)
    finally:
        fleet.store.set_faults()
    r = result["r"]
    assert r.status_code == 503 and "timeout" in r.text and r.headers.get("Retry-After"), _error(r)
    assert result["s"] < 20, f"the slow store held the request {result['s']:.1f}s"
    assert others < result["s"]
    assert fleet.a.metrics().value("safelora_source_fetch_failures_total", source="s3", reason="timeout") >= 1


def test_store_down_is_a_503_while_others_are_served(fleet, e2e_world, e2e):
    fleet.store.stop()
    try:
        r = fleet.a.complete("s3:acme/late")
        assert r.status_code == 503 and "unreachable" in r.text and r.headers.get("Retry-After"), _error(r)
        _served_ok(fleet.a, e2e, e2e_world, "s3:acme/bot")
        _served_ok(fleet.a, e2e, e2e_world, LOCAL_TENANT)
    finally:
        fleet.store.start()
        fleet.seed_store()
    assert fleet.a.complete("s3:acme/late").status_code == 200, "the store is back: the adapter is served"


def test_no_secret_in_logs_or_answers(fleet):
    for server in (fleet.a, fleet.b):
        assert SECRET_KEY not in server.log_text()
        assert fleet.key_file.read_text() not in server.log_text()
    for path in Path(fleet.root).rglob("*.log"):
        assert SECRET_KEY not in path.read_text(errors="replace"), path


def test_misconfigured_object_storage_refuses_to_start(e2e_world, tmp_path):
    from support.server import run_startups

    key = tmp_path / "short.key"
    key.write_bytes(b"short")
    base = dict(bank=str(e2e_world.bank), cache_dir=str(tmp_path / "cache"), device="cpu")
    configs = {
        "bad_uri": write_config(tmp_path / "bad_uri.yaml", **base, s3={"enabled": True, "uri": "https://adapters/x"}),
        "short_key": write_config(
            tmp_path / "short_key.yaml",
            **base,
            shared_cache={"enabled": True, "uri": "s3://fleet/entries/", "mac_key_file": str(key)},
        ),
    }
    results = run_startups(e2e_world.aligned, configs, tmp_path, timeout=300)
    for case, says in (("bad_uri", "s3.uri must be an s3://bucket/prefix/ URI"), ("short_key", "at least 32")):
        rc, out, _ = results[case]
        assert rc not in (None, 0) and says in out, (case, rc, out[-3000:])
