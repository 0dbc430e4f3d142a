"""Untrusted tenants on one live server: who picks the policy, altered cache entries,
refusals that are expensive to reach, floods, the hub's allow-list.

One plugin server (``served_names: location``, the default) with tenant rules
``trusted/*`` (never projected) and ``canary/*`` (shadow: served unprojected), the hub
source enabled with an empty allow-list, ``--max-loras 1 --max-cpu-loras 1`` so every
switch of adapter makes vLLM's worker re-read an entry from disk, and a preparation
throttle of one at a time with no queue.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hardening_support as hs
from support.server import Server, new_server
from vllm_safelora.cache import remove_tree

pytestmark = pytest.mark.e2e

RULES = [
    {"match": "trusted/*", "policy": {"select": "threshold", "threshold": -1.0}},
    {"match": "canary/*", "shadow": True},
]
SAME_TOL = 1e-4
MAX_TRACKED = 8


@pytest.fixture(scope="module")
def tenants(hardening_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("tenants")
    root = hardening_world.adapter_root
    for i, name in enumerate(("evil/a", "evil/b", "trusted/own", "victim/v", "alter/x", "other/y")):
        if not (root / name).exists():
            hs.make_valid_adapter(root / name, hardening_world.template, seed=7000 + i)
    (root / "trusted" / "link").unlink(missing_ok=True)
    os.symlink(root / "evil" / "a", root / "trusted" / "link")
    cache_dir = work / "cache"
    config = hardening_world.config(
        work / "tenants.yaml",
        cache_dir,
        tenants=RULES,
        hub={"enabled": True},
        max_concurrent_preparations=1,
        max_queued_preparations=0,
        max_tracked_adapters=MAX_TRACKED,
    )
    server = new_server("tenants", hardening_world.aligned, config, work, ["--max-loras", "1", "--max-cpu-loras", "1"])
    server.start().wait_ready()
    try:
        yield server, root, cache_dir
    finally:
        server.stop()


def top_logprobs(server: Server, model: str) -> dict[str, float]:
    r = server.complete(model, max_tokens=1, logprobs=5)
    assert r.status_code == 200, (model, r.status_code, r.text)
    return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return set(a) == set(b) and max(abs(a[t] - b[t]) for t in a) < SAME_TOL


def summary(server: Server, name: str) -> dict:
    r = server.get(f"/safelora/v1/adapters/{name}")
    assert r.status_code == 200, r.text
    return r.json()["summary"]


# --------------------------------------------------------------------------- class 3: the caller picks the tenant


@pytest.mark.parametrize("label", ["trusted/x", "canary/x", "trusted/own", "victim/v", "x", "hub:acme/x"])
def test_a_load_cannot_borrow_another_tenants_name_or_policy(tenants, label):
    server, root, _ = tenants
    before = {m["id"] for m in server.get("/v1/models").json()["data"]}
    r = server.post("/v1/load_lora_adapter", json={"lora_name": label, "lora_path": str(root / "evil" / "b")})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "(invalid_name)" in message and "lora_name='evil/b'" in message, message
    assert {m["id"] for m in server.get("/v1/models").json()["data"]} == before
    assert server.healthy()


def test_policy_follows_where_the_bytes_are(tenants):
    server, root, _ = tenants
    # the trusted tenant's own adapter gets its rule ...
    own = summary(server, "trusted/own") if server.complete("trusted/own").status_code == 200 else None
    assert own and own["tenant_rule"] == "trusted/*" and own["outcome"] == "unchanged", own
    # ... a link in the trusted directory to an evil adapter leads out of trusted's namespace: refused
    r = server.complete("trusted/link")
    assert r.status_code == 400 and "(outside_namespace)" in r.text, r.text
    # loaded by path under its own location name: default policy, projected
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "evil/b", "lora_path": str(root / "evil" / "b")})
    assert r.status_code == 200, r.text
    evil = summary(server, "evil/b")
    assert evil["tenant_rule"] == "default" and evil["outcome"] == "modified" and evil["mode"] == "enforce"


def test_load_inplace_cannot_swap_another_tenants_adapter(tenants):
    server, root, _ = tenants
    victim = top_logprobs(server, "victim/v")
    entry = summary(server, "victim/v")["output_hash"]
    for path in (root / "evil" / "a", root / "evil" / "b", root / "trusted" / "link"):
        r = server.post(
            "/v1/load_lora_adapter", json={"lora_name": "victim/v", "lora_path": str(path), "load_inplace": True}
        )
        assert r.status_code == 400, r.text
    assert summary(server, "victim/v")["output_hash"] == entry
    assert same(top_logprobs(server, "victim/v"), victim)


def test_a_load_vllm_refuses_is_not_projected_listed_or_counted(tenants):
    server, root, _ = tenants
    assert server.complete("other/y").status_code == 200
    m0 = server.metrics()
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "other/y", "lora_path": str(root / "other" / "y")})
    assert r.status_code == 400 and "already been loaded" in r.text, r.text
    m1 = server.metrics()
    for sample in ("safelora_adapters_total", "safelora_projections_total", "safelora_cache_requests_total"):
        assert m1.value(sample) == m0.value(sample), sample


# --------------------------------------------------------------------------- class 4: altered cache entries


def _alter_in_place(path: Path, data: bytes) -> None:
    """Rewrite a file's bytes keeping its size, inode and mtime (what a stat check sees)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    os.chmod(path, 0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    _alter_in_place(path, bytes(data))


def _unprojected_weights(raw_dir: Path):
    def alter(path: Path) -> None:
        served, raw = load_file(path), load_file(raw_dir / hs.WEIGHTS)
        bare = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
        # the tenant's own, unprojected weights in the projected entry's layout: same size
        swapped = {k: bare[k.removeprefix("base_model.model.")] for k in served}
        assert any(not torch.equal(swapped[k], served[k]) for k in served), "the entry was not projected"
        tmp = path.with_name("swap.tmp")
        save_file(swapped, tmp, metadata={"format": "pt"})
        data = tmp.read_bytes()
        tmp.unlink()
        if len(data) != path.stat().st_size:
            pytest.skip("the unprojected weights do not serialise to the entry's size here")
        _alter_in_place(path, data)

    return alter


def _alpha_digit(path: Path) -> None:
    text = path.read_text()
    doc = json.loads(text)
    old = json.dumps(doc["lora_alpha"])
    assert f'"lora_alpha": {old}' in text
    new = "9" * len(old) if old != "9" * len(old) else "8" * len(old)
    _alter_in_place(path, text.replace(f'"lora_alpha": {old}', f'"lora_alpha": {new}').encode())


ALTERATIONS = {
    "weights-bit-flip": (hs.WEIGHTS, _flip_last_byte),
    "weights-unprojected": (hs.WEIGHTS, None),  # filled per test: needs the raw adapter
    "config-alpha": (hs.CONFIG, _alpha_digit),
    "report-bit-flip": ("safelora_report.json", _flip_last_byte),
}


@pytest.mark.parametrize("variant", list(ALTERATIONS))
def test_an_altered_entry_never_serves_and_never_stops_the_engine(tenants, hardening_world, variant):
    """The worker re-reads an entry after vLLM's own LRU evicted the adapter (--max-cpu-loras 1).
    An entry altered with size, inode and mtime kept still has a new ctime, so the front end's
    per-request stat check catches it before the engine sees the request: the entry is rebuilt
    from the upload and the engine reloads it, so that very request is served projected; the
    engine keeps serving everyone and the altered bytes are never served."""
    server, root, cache_dir = tenants
    name = "alter/x"
    base = top_logprobs(server, str(hardening_world.aligned))
    projected = top_logprobs(server, name)
    other = top_logprobs(server, "other/y")  # evicts alter/x from the worker (1 CPU slot)
    entry = cache_dir / "entries" / server.get(f"/safelora/v1/adapters/{name}").json()["cache_entry"]
    file_name, alter = ALTERATIONS[variant]
    alter = alter or _unprojected_weights(root / "alter" / "x")
    alter(entry / file_name)
    m0 = server.metrics()

    during = top_logprobs(server, name)  # the front end finds the altered entry
    assert server.healthy(), server.log_tail()
    assert same(during, projected) and not same(during, base), (variant, during)
    after = top_logprobs(server, name)  # rebuilt from the upload and reloaded
    assert same(after, projected), (variant, after, projected)
    assert same(top_logprobs(server, "other/y"), other)
    m1 = server.metrics()
    assert m1.value("safelora_guard_events_total", where="entry_changed") > m0.value(
        "safelora_guard_events_total", where="entry_changed"
    ), variant
    assert "failed verification" in server.log_text()
    assert hs.cache_consistency(cache_dir)[1] == []


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_an_entry_removed_while_a_request_runs_fails_that_request_not_answers_without_it(tenants, stream):
    """The window between the front end's check and the worker's read: a worker that finds the
    entry altered removes it and runs the batch without the adapter. The front end sees the
    entry gone before returning any further output, so the request fails with a 503 naming
    the adapter (mid-stream: an error event) instead of a 200 with another model's tokens."""
    import requests

    server, _, cache_dir = tenants
    name = "alter/x"
    projected = top_logprobs(server, name)
    entry = cache_dir / "entries" / server.get(f"/safelora/v1/adapters/{name}").json()["cache_entry"]
    m0 = server.metrics()
    body = {"model": name, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first, first
            remove_tree(entry)  # what the worker does with an entry it found altered
            rest = [line for line in lines if line.startswith("data: ")]
        errors = [line for line in rest if '"error"' in line]
        assert errors and name in errors[0] and "changed on disk" in errors[0], rest[-3:]
        tokens = [line for line in rest if '"text"' in line and '"error"' not in line]
        assert len(tokens) < 199, "the request ran to its end without the adapter's entry"
    else:
        # A whole answer gives the client no sign that it runs, and on a quiet machine 200 tiny-model
        # tokens can finish between two scrapes: a request that ended before it was seen running
        # proves nothing, so it is sent again rather than taken as a pass or a failure.
        with ThreadPoolExecutor(1) as pool:
            for _ in range(8):
                pending = pool.submit(requests.post, f"{server.base_url}/v1/completions", json=body, timeout=120)
                while not pending.done() and server.metrics().value("vllm:num_requests_running") < 1:
                    time.sleep(0.002)
                if not pending.done():
                    break
                assert pending.result().status_code == 200, pending.result().text[:300]
            else:
                pytest.fail("in 8 attempts no whole request was seen running before it ended")
            remove_tree(entry)
            r = pending.result()
        assert r.status_code == 503 and name in r.text and "changed on disk" in r.text, (r.status_code, r.text[:300])
    m1 = server.metrics()
    assert m1.value("safelora_guard_events_total", where="entry_changed_mid_request") > m0.value(
        "safelora_guard_events_total", where="entry_changed_mid_request"
    )
    assert server.healthy(), server.log_tail()
    assert same(top_logprobs(server, name), projected)  # rebuilt from the upload
    assert hs.cache_consistency(cache_dir)[1] == []


@pytest.mark.parametrize("variant", ["extra-file", "truncated", "deleted"])
def test_visible_entry_changes_are_rebuilt_before_the_engine_sees_them(tenants, variant):
    server, _, cache_dir = tenants
    name = "alter/x"
    projected = top_logprobs(server, name)
    entry = cache_dir / "entries" / server.get(f"/safelora/v1/adapters/{name}").json()["cache_entry"]
    os.chmod(entry, 0o755)
    if variant == "extra-file":
        save_file({"new_embeddings": torch.ones(2, 2)}, entry / "new_embeddings.safetensors")
    elif variant == "truncated":
        os.chmod(entry / hs.WEIGHTS, 0o644)
        with open(entry / hs.WEIGHTS, "r+b") as f:
            f.truncate(100)
    else:
        remove_tree(entry)
    top_logprobs(server, "other/y")
    assert same(top_logprobs(server, name), projected), variant
    assert server.healthy()
    assert hs.cache_consistency(cache_dir)[1] == []


# --------------------------------------------------------------------------- class 5: refusals and floods


def test_refusals_are_remembered(tenants, hardening_world):
    server, root, _ = tenants
    config, tensors = hs.load_template(hardening_world.template)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    names = [f"nanflood/c{i}" for i in range(4)]
    for name in names:
        hs.write_adapter(root / name, config, tensors)
    m0 = server.metrics()
    for name in names + names + names:
        r = server.complete(name)
        assert r.status_code == 400 and "(non_finite)" in r.text, r.text
    m1 = server.metrics()
    assert m1.refusals("non_finite") - m0.refusals("non_finite") == 12
    # parsed once: 3 copies were recognised by content, 8 repeats by their unchanged files
    assert m1.value("safelora_refusal_cache_hits_total") - m0.value("safelora_refusal_cache_hits_total") == 11
    assert server.healthy()


def test_a_burst_of_new_adapters_gets_503_with_retry_after_never_an_error(tenants, hardening_world):
    server, root, _ = tenants
    names = [f"burst/a{i:02d}" for i in range(32)]
    for i, name in enumerate(names):
        hs.make_valid_adapter(root / name, hardening_world.template, seed=9000 + i)
    victim = top_logprobs(server, "victim/v")
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda n: server.complete(n), names))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    busy = [r for r in responses if r.status_code == 503]
    assert busy, "32 concurrent new adapters never exceeded one preparation at a time"
    for r in busy:
        assert "busy preparing other adapters" in r.text and int(r.headers["Retry-After"]) >= 1, (r.headers, r.text)
    m = server.metrics()
    assert m.value("safelora_overload_total") >= len(busy)
    assert m.value("safelora_prepare_capacity") == 1 and m.value("safelora_prepare_inflight") == 0
    # every refused one is served once the burst is over; others were served throughout
    for name, r in zip(names, responses):
        if r.status_code == 503:
            assert server.complete(name).status_code == 200, name
    assert same(top_logprobs(server, "victim/v"), victim)


def test_served_names_stay_bounded_whatever_was_ever_served(tenants):
    """After ~50 distinct adapters, vLLM's own table of served names and the audit listing
    hold at most max_tracked_adapters (least recently used names are unloaded); a dropped
    name is simply resolved again."""
    server, _, _ = tenants
    served = [m["id"] for m in server.get("/v1/models").json()["data"] if m["id"] != str(m.get("root"))]
    listed = server.get("/safelora/v1/adapters").json()
    assert len(listed) <= MAX_TRACKED, sorted(listed)
    assert len(served) <= MAX_TRACKED + 1, served  # + the base model
    assert server.complete("burst/a00").status_code == 200


# --------------------------------------------------------------------------- class 7: the hub is deny-by-default


@pytest.mark.parametrize("name", ["hub:acme/lora", "hub:meta-llama/Llama-2-7b-chat-hf", "hub:a/b"])
def test_the_hub_admits_nothing_without_an_allow_list(tenants, name):
    server, _, _ = tenants
    r = server.complete(name)
    assert r.status_code == 400 and "allow-list is empty" in r.text, r.text
    assert "hub.allow is empty" in server.log_text()
