"""Replicas behind ``vllm-router``: two live plugin servers reading adapters from a real S3 server
process (``support/s3_server.py``) and sharing the fleet tier, with vllm-project's Rust load balancer
in front of them (``support/fleet.py``).

Router: ``vllm-router`` 0.1.17 (PyPI, the ``fleet`` extra), one process per policy, each started as
``python -m vllm_router.launch_router --host 127.0.0.1 --port P --prometheus-host 127.0.0.1
--prometheus-port Q --worker-urls URL_A URL_B --policy POLICY`` + ``ROUTER_FLAGS``:

* ``round_robin``: requests for one adapter alternate between the replicas. The fleet projects it
  once (``safelora_projections_total`` summed over both replicas is 1, the other counts
  ``safelora_shared_tier_total{result="hit"}``) and both serve the offline projection's tokens and
  logprobs.
* ``round_robin`` again, and replica b SIGKILLed while it uploads an entry to the tier (uploads made
  slow by the store's fault layer): the router retries on replica a (``--retry-max-retries``) and
  stops choosing b (``--health-check-interval-secs 1 --health-failure-threshold 1``); every later
  request is answered by a with the projected output, and the tier holds no entry that does not
  verify (``audit_tier``: MAC and blake3 recomputed by the test); b's unfinished upload has no
  manifest, so a counts a tier miss and projects the adapter itself.
* ``consistent_hash``: 0.1.17 hashes a routing key taken from the headers ``X-Session-ID``,
  ``X-User-ID``, ``X-Tenant-ID``, ``X-Correlation-ID``, ``X-Request-ID``, ``X-Trace-ID`` (first
  present), else from the prompt; it never reads ``model`` (the adapter name) or the body's ``user``.
  A client (or gateway) that sends the adapter name as ``X-Session-ID`` gets LoRA affinity: every
  request for one adapter reaches the same replica, which alone loads it (no tier hit at all).

The last test kills replica b: it stays the last of the module.
"""

from __future__ import annotations

import threading
import time

import pytest
from support.fleet import audit_tier, open_fleet, router_version, start_router

pytest.importorskip("vllm_router", reason="vllm-router is not installed (pip install -e '.[fleet]')")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROUTER_VERSION = "0.1.17"
ROUTER_FLAGS = [
    "--worker-startup-check-interval",
    "1",
    "--worker-startup-timeout-secs",
    "60",
    "--health-check-interval-secs",
    "1",
    "--health-failure-threshold",
    "1",
    "--retry-max-retries",
    "3",
    "--retry-initial-backoff-ms",
    "100",
    "--request-timeout-secs",
    "120",
]
LOGPROB_TOL = 1e-3
SAME_TOL = 1e-5
# name under s3://adapters/tenants/ -> adapter seed (contents distinct from every other module's)
SPREAD = "route/spread"
STICKY = [f"route/sticky{i}" for i in range(4)]
CRASH = [f"route/crash{i}" for i in range(4)]
SEEDS = {SPREAD: 140, **{n: 150 + i for i, n in enumerate(STICKY)}, **{n: 160 + i for i, n in enumerate(CRASH)}}
IGNORED = ("unsigned", "bad_mac", "mis_bound", "bad_file")


@pytest.fixture(scope="module")
def routed(e2e_world, tiny_adapter_factory, tmp_path_factory):
    assert router_version() == ROUTER_VERSION, "the flags and behaviour described here are 0.1.17's"
    root = tmp_path_factory.mktemp("router_fleet")
    fleet = open_fleet(root)
    routers = []
    try:
        sources = {name: tiny_adapter_factory("random", seed=seed) for name, seed in SEEDS.items()}
        for name, src in sources.items():
            fleet.upload_adapter(name, src)
        a, b = fleet.start_replicas(e2e_world, ("a", "b"))
        for policy in ("round_robin", "consistent_hash"):
            routers.append(start_router(f"router-{policy}", [a, b], root, policy, ROUTER_FLAGS))
        rr, ch = routers
        yield type("Routed", (), dict(fleet=fleet, a=a, b=b, rr=rr, ch=ch, sources=sources))
    finally:
        for r in routers:
            r.stop()
        fleet.stop()


def _counts(server) -> dict[str, float]:
    m = server.metrics()
    return {
        "served": m.value("vllm:request_success_total"),
        "projections": m.projections(),
        **{f"tier_{r}": m.value("safelora_shared_tier_total", result=r) for r in ("hit", "miss", *IGNORED)},
    }


def _delta(after: dict, before: dict) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _reference(e2e_world, peft_reference, routed, name):
    projected = e2e_world.projected(name.replace("/", "-"), src=routed.sources[name])
    return peft_reference.next_token_logprobs(projected)


def test_one_adapter_reaches_both_replicas_and_is_projected_once(routed, e2e_world, peft_reference, e2e):
    replicas = {"a": routed.a, "b": routed.b}
    before = {r: _counts(s) for r, s in replicas.items()}
    t0 = time.monotonic()
    outs = [e2e.complete(routed.rr, f"s3:{SPREAD}", e2e_world.token_ids, max_tokens=8, logprobs=5) for _ in range(4)]
    took = time.monotonic() - t0
    d = {r: _delta(_counts(s), before[r]) for r, s in replicas.items()}
    assert d["a"]["served"] >= 1 and d["b"]["served"] >= 1, f"round_robin sent every request to one replica: {d}"
    assert d["a"]["served"] + d["b"]["served"] == len(outs)
    assert d["a"]["projections"] + d["b"]["projections"] == 1, f"the fleet projected the adapter more than once: {d}"
    builder, other = ("a", "b") if d["a"]["projections"] == 1 else ("b", "a")
    assert d[other]["tier_hit"] == 1 and d[other]["projections"] == 0, d
    assert all(d[r][f"tier_{x}"] == 0 for r in d for x in IGNORED), d
    for out in outs[1:]:
        assert out.token_ids == outs[0].token_ids
        assert max(abs(out.first_top[t] - outs[0].first_top[t]) for t in out.first_top) < SAME_TOL
    reference = _reference(e2e_world, peft_reference, routed, SPREAD)
    e2e.assert_matches_reference(outs[0].first_top, reference, LOGPROB_TOL, "through the router")
    raw = peft_reference.next_token_logprobs(routed.sources[SPREAD])
    assert e2e.max_logprob_gap(outs[0].first_top, raw) > 0.05, "served the unprojected adapter"
    chosen = routed.rr.metrics().by_labels("vllm_router_processed_requests_total")
    print(
        f"\n[router] round_robin, {len(outs)} requests for s3:{SPREAD} in {took:.1f}s: served by a "
        f"{d['a']['served']:g}, b {d['b']['served']:g}; projected on {builder} only, {other} counted a tier hit; "
        f"router's choices {chosen}"
    )


def test_adapter_name_as_session_key_keeps_each_adapter_on_one_replica(routed, e2e_world, e2e):
    replicas = {"a": routed.a, "b": routed.b}
    start = {r: _counts(s) for r, s in replicas.items()}
    placed, outputs = {}, {}
    for name in STICKY:
        before = {r: _counts(s) for r, s in replicas.items()}
        for _ in range(4):
            r = e2e.complete_http(
                routed.ch, f"s3:{name}", e2e_world.token_ids, max_tokens=4, headers={"X-Session-ID": f"s3:{name}"}
            )
            assert r.status_code == 200, r.text
            out = e2e.completion_from_json(r.json())
            outputs.setdefault(name, out)
            assert out.token_ids == outputs[name].token_ids
        d = {r: _delta(_counts(s), before[r])["served"] for r, s in replicas.items()}
        assert sorted(d.values()) == [0, 4], f"s3:{name}'s requests were split between replicas: {d}"
        placed[name] = max(d, key=d.get)
    total = {r: _delta(_counts(s), start[r]) for r, s in replicas.items()}
    assert total["a"]["projections"] + total["b"]["projections"] == len(STICKY), total
    # Each adapter only ever reached its own replica: nobody needed another's entry.
    assert total["a"]["tier_hit"] + total["b"]["tier_hit"] == 0, total
    print(f"\n[router] consistent_hash on X-Session-ID = adapter name, 4 requests each: {placed}")


def test_replica_killed_mid_traffic_the_other_serves_and_the_tier_has_no_partial_entry(
    routed, e2e_world, peft_reference, e2e
):
    fleet, a, b = routed.fleet, routed.a, routed.b
    assert audit_tier(fleet).unpublished == {}
    a_before, b_before = _counts(a), _counts(b)
    # Slow uploads to the tier (each object ~1.5 s) leave b's upload in progress long enough to kill it in.
    fleet.store.set_faults({"contains": "/fleet/entries/", "method": "PUT", "delay_s": 1.5})
    results, stop = [], threading.Event()

    def traffic():
        deadline = time.monotonic() + 300
        for i in range(4 * len(CRASH)):
            if stop.is_set() or time.monotonic() > deadline:
                return
            name = CRASH[i % len(CRASH)]
            t0 = time.monotonic()
            try:
                r = e2e.complete_http(routed.rr, f"s3:{name}", e2e_world.token_ids, max_tokens=4)
                outcome = r.status_code, (r.json() if r.status_code == 200 else r.text)
            except Exception as exc:  # the router itself must answer; recorded, and asserted below
                outcome = None, repr(exc)
            results.append((name, t0, time.monotonic(), *outcome))

    thread = threading.Thread(target=traffic, daemon=True)
    killed_at = b_projections = b_served = partial = caught = None
    try:
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():
            m = b.metrics()
            if m.value("safelora_prepare_inflight") >= 1:
                # b is preparing the one request in flight; an entry in the tier that is not whole is its upload.
                caught = audit_tier(fleet)
                if caught.unpublished or caught.problems:
                    b_projections = m.projections() - b_before["projections"]
                    b_served = m.value("vllm:request_success_total") - b_before["served"]
                    b.kill()
                    killed_at = time.monotonic()
                    partial = {k[:16]: v for k, v in caught.unpublished.items()} | {p: "" for p in caught.problems}
                    break
            time.sleep(0.1)
        thread.join(300)
    finally:
        stop.set()
        fleet.store.set_faults()
    assert killed_at is not None, f"replica b was never caught uploading to the tier: {results}"
    assert not thread.is_alive() and not b.alive()

    failed = [r for r in results if r[3] != 200]
    after_kill = [r for r in results if r[1] > killed_at]
    in_flight = [r for r in results if r[1] <= killed_at < r[2]]
    assert after_kill, "no request was sent after the kill"
    # The request b was preparing when it died is retried on a by the router (no answer had started).
    assert failed == [], f"requests through the router failed (in flight at the kill: {in_flight}): {failed}"
    for name in CRASH:
        reference = _reference(e2e_world, peft_reference, routed, name)
        for _, _, _, status, body in results:
            if status == 200 and body["model"] == f"s3:{name}":
                e2e.assert_matches_reference(e2e.completion_from_json(body).first_top, reference, LOGPROB_TOL, name)

    audit = audit_tier(fleet)
    assert audit.problems == [], audit.problems
    assert set(audit.entries) | set(audit.unpublished) >= set(caught.unpublished)
    d = _delta(_counts(a), a_before)
    assert d["served"] + b_served == len(results), "every answer came from a, or from b before it died"
    assert all(d[f"tier_{x}"] == 0 for x in IGNORED), f"replica a read an unusable tier entry: {d}"
    assert d["tier_miss"] >= 1, d
    # Every adapter projected once in the fleet, and the one whose upload died once more, by a.
    assert d["projections"] + b_projections == len(CRASH) + 1, (d, b_projections)
    rm = routed.rr.metrics()
    print(
        f"\n[router] replica b SIGKILLed while uploading (the tier's unfinished entries then: {partial}): "
        f"{len(results)} requests, {len(failed)} failed ({len(in_flight)} in flight at the kill, "
        f"{len(after_kill)} sent after it); served by b {b_served:g} before the kill, by a {d['served']:g}; "
        f"router: retries {rm.value('vllm_router_retries_total'):g}, worker health a "
        f"{rm.value('vllm_router_worker_health', worker=a.base_url):g} b "
        f"{rm.value('vllm_router_worker_health', worker=b.base_url):g}; tier: {len(audit.entries)} entries verify, "
        f"unfinished uploads {sorted(k[:16] for k in audit.unpublished)}; fleet projections b {b_projections:g} + "
        f"a {d['projections']:g}, a's tier hits {d['tier_hit']:g}, misses {d['tier_miss']:g}"
    )
