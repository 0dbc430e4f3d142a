"""Crash safety and many replicas, on one cache directory.

Phase 1 (server A): serve adapter ``tamper/a000`` and record its logprobs, then fire
40 concurrent loads of new adapters and SIGKILL A's whole process group as soon as a
projection is being written (a ``tmp/build.*`` directory exists next to sealed entries).

While A is down: a temp build dir of A is planted as well (so the clean-up is tested even
if the kill missed every build), one sealed entry is torn (weights truncated), another
loses its manifest, and the tensor bytes of the served ``tamper/a000`` entry are altered
in place (same size, header intact: only the sha256 can tell).

Phase 2 (servers B and C, started together on the same cache): no temp dir of A is left,
every adapter is requested again (B and C alternately) and
* the projections counted by B + C equal exactly the adapters without an intact entry
  (interrupted, torn, tampered): nothing partial or altered is served, everything intact is reused;
* ``tamper/a000`` is served with the logprobs A served before the crash, which match
  transformers + peft on the correct projection and not on the altered bytes;
* afterwards every entry verifies.

Phase 3 (replicas): B and C are hammered at once with the same 8 new adapters (6
requests each, 3 per server, 48 in all): every answer is 200, both servers give the same
tokens and logprobs, B + C project each content exactly once (flock single-flight across
processes; the bound is <= 2x), and no entry is torn.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import hardening_support as hs
from support.server import PROMPT_TEXT, Server, new_server, start_all

pytestmark = pytest.mark.e2e

N_CRASH = 40
N_REPLICA = 8
SAME_TOL = 1e-4
REF_TOL = 2e-3


def _first_top(resp_json: dict) -> dict[int, float]:
    top = resp_json["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(t.split(":", 1)[1]): v for t, v in top.items()}


def _complete_ids(server: Server, model: str, ids: list[int]):
    return server.complete(model, prompt=ids, max_tokens=1, logprobs=5, return_tokens_as_token_ids=True)


def _reference_logprobs(model_dir: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).eval()
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def _gap(top: dict[int, float], ref: torch.Tensor) -> float:
    return max(abs(v - float(ref[t])) for t, v in top.items())


def _alter_tensor_bytes(entry: Path) -> None:
    """Negate and scale one lora_B in place: same size, same header, other sha256."""
    f = entry / hs.WEIGHTS
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = sorted(k for k in header if ".lora_B." in k)[0]
    assert header[key]["dtype"] == "F32"
    b, e = header[key]["data_offsets"]
    start = 8 + n + b
    values = torch.frombuffer(bytearray(data[start : 8 + n + e]), dtype=torch.float32) * -25.0
    data[start : 8 + n + e] = values.numpy().tobytes()
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def crash_world(hardening_world, tmp_path_factory):
    from transformers import AutoTokenizer

    world = hardening_world
    work = tmp_path_factory.mktemp("crash")
    cache = work / "cache"
    config = world.config(work / "crash.yaml", cache)
    names = world.new_adapters("crash", N_CRASH, seed0=5000)
    tamper = world.new_adapters("tamper", 1, seed0=6000)[0]
    tok = AutoTokenizer.from_pretrained(str(world.aligned))
    ids = list(tok(PROMPT_TEXT)["input_ids"])
    return dict(world=world, work=work, cache=cache, config=config, names=names, tamper=tamper, ids=ids)


@pytest.fixture(scope="module")
def after_crash(crash_world):
    """Phase 1: run A, crash it mid-projection; then damage the cache while it is down."""
    cw = crash_world
    world, cache = cw["world"], cw["cache"]
    a = new_server("crash-A", world.aligned, cw["config"], cw["work"]).start().wait_ready()
    try:
        r = _complete_ids(a, cw["tamper"], cw["ids"])
        assert r.status_code == 200, r.text
        served_before = _first_top(r.json())
        tamper_entry = cache / "entries" / a.get(f"/safelora/v1/adapters/{cw['tamper']}").json()["cache_entry"]
        good_copy = cw["work"] / "tamper-correct"
        shutil.copytree(tamper_entry, good_copy)

        def load(name):
            try:
                return a.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(world.adapter_root / name)}
                ).status_code
            except Exception as exc:  # noqa: BLE001 - the server is killed under it
                return type(exc).__name__

        pool = ThreadPoolExecutor(16)
        futures = [pool.submit(load, n) for n in cw["names"]]
        tmp_dir, entries_dir = cache / "tmp", cache / "entries"
        caught_build, t0 = None, time.monotonic()
        while time.monotonic() - t0 < 120:
            builds = [n for n in os.listdir(tmp_dir) if n.startswith("build.")]
            if builds and len(os.listdir(entries_dir)) >= 4:
                caught_build = builds
                break
            if all(f.done() for f in futures):
                break
        a_pid = a.pid
        a.kill()  # SIGKILL to the whole tree at once
        pool.shutdown(wait=True)
    finally:
        a.stop()
    leftovers = sorted(n for n in os.listdir(cache / "tmp") if n.startswith("build."))
    print(f"\n[hardening] crash: SIGKILL with builds in progress {caught_build}; left in tmp/: {leftovers}")

    # Damage while down.
    from vllm_safelora.cache import _HOST

    planted = cache / "tmp" / f"build.{a_pid}.{_HOST}.{'0' * 16}.{uuid.uuid4().hex[:12]}"
    planted.mkdir()
    (planted / hs.WEIGHTS).write_bytes(b"\x00" * 100)  # a half-written build
    intact = sorted(
        d
        for d in os.listdir(cache / "entries")
        if d != tamper_entry.name and hs.verify_entry_dir(cache / "entries" / d) is None
    )
    assert len(intact) >= 2, f"too few sealed entries before the kill: {intact}"
    torn, no_manifest = cache / "entries" / intact[0], cache / "entries" / intact[1]
    w = torn / hs.WEIGHTS
    os.chmod(w, 0o644)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (no_manifest / "cache_entry.json").unlink()
    _alter_tensor_bytes(tamper_entry)
    bad_copy = cw["work"] / "tamper-altered"
    shutil.copytree(tamper_entry, bad_copy)

    # Which adapters have an intact entry now (read from manifests; independent of the cache code)?
    intact_hashes = set()
    for d in os.listdir(cache / "entries"):
        if hs.verify_entry_dir(cache / "entries" / d) is None:
            intact_hashes.add(
                json.loads((cache / "entries" / d / "cache_entry.json").read_text())["key"]["adapter_hash"]
            )
    requested = [cw["tamper"], *cw["names"]]
    expected_projections = sum(1 for n in requested if hs.content_id(world.adapter_root / n) not in intact_hashes)
    # The adapters whose build the kill interrupted (tmp/build.<pid>.<host>.<digest[:16]>.<uuid>).
    from vllm_safelora.cache import CacheKey

    key = json.loads((good_copy / "cache_entry.json").read_text())["key"]
    digests = {
        CacheKey(hs.content_id(world.adapter_root / n), key["bank_id"], key["policy_id"]).digest(): n for n in requested
    }
    interrupted = {digests[d]: d for d in digests if any(x.split(".")[3] == d[:16] for x in leftovers)}
    assert len(interrupted) == len(leftovers)
    return dict(
        a_pid=a_pid,
        served_before=served_before,
        good_copy=good_copy,
        bad_copy=bad_copy,
        caught_build=caught_build,
        leftovers=leftovers,
        planted=planted.name,
        damaged={torn.name, no_manifest.name, tamper_entry.name},
        expected_projections=expected_projections,
        requested=requested,
        interrupted=interrupted,
    )


@pytest.fixture(scope="module")
def replicas(crash_world, after_crash):
    cw = crash_world
    servers = [new_server(n, cw["world"].aligned, cw["config"], cw["work"]) for n in ("replica-B", "replica-C")]
    start_all(servers)
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_restart_after_sigkill_uses_no_partial_entry(crash_world, after_crash, replicas):
    cw, ac = crash_world, after_crash
    cache = cw["cache"]
    b, c = replicas
    # Start-up clean-up: nothing of the killed server is left in tmp/.
    left = [n for n in os.listdir(cache / "tmp") if n.split(".")[1:2] == [str(ac["a_pid"])]]
    assert not left, f"temp builds of the killed server survived the restart: {left}"
    m0 = [s.metrics() for s in (b, c)]

    # The altered entry is detected and rebuilt: served = A's answer before the crash = correct projection.
    r = _complete_ids(b, cw["tamper"], cw["ids"])
    assert r.status_code == 200, r.text
    served_after = _first_top(r.json())
    assert set(served_after) == set(ac["served_before"])
    assert max(abs(served_after[t] - ac["served_before"][t]) for t in served_after) < SAME_TOL
    ref_good = _reference_logprobs(cw["world"].aligned, ac["good_copy"], cw["ids"])
    ref_bad = _reference_logprobs(cw["world"].aligned, ac["bad_copy"], cw["ids"])
    assert _gap(served_after, ref_good) < REF_TOL, "served logprobs differ from the correct projection"
    assert _gap(served_after, ref_bad) > 0.05, "served logprobs match the ALTERED entry"

    # Every other adapter, alternately on B and C: interrupted / torn ones are projected again.
    statuses = {}
    for i, name in enumerate(ac["requested"][1:]):
        statuses[name] = (b, c)[i % 2].complete(name).status_code
    assert all(s == 200 for s in statuses.values()), statuses
    m1 = [s.metrics() for s in (b, c)]
    projections = sum(m1[i].projections() - m0[i].projections() for i in range(2))
    print(
        f"\n[hardening] restart: {len(ac['requested'])} adapters requested, {projections:g} projected again "
        f"(expected {ac['expected_projections']}: interrupted + torn + altered), damaged entries {len(ac['damaged'])}"
    )
    assert projections == ac["expected_projections"]
    assert projections >= 3  # at least the torn, manifest-less and altered entries
    logs = b.log_text() + c.log_text()
    assert "failed verification" in logs
    # Nothing in entries/ is partial or altered any more; the damaged ones were rebuilt in place.
    count, problems = hs.cache_consistency(cache)
    assert not problems, problems
    assert ac["damaged"] <= hs.entry_dirs(cache)
    # The adapters whose projection was killed half-way were projected again and are intact now.
    for name, digest in ac["interrupted"].items():
        assert hs.verify_entry_dir(cache / "entries" / digest) is None, name
    assert b.healthy() and c.healthy()


def test_two_replicas_share_one_cache(crash_world, replicas):
    cw = crash_world
    b, c = replicas
    world = cw["world"]
    names = world.new_adapters("replica", N_REPLICA, seed0=7000)
    m0 = [s.metrics() for s in (b, c)]
    jobs = [(s, n) for n in names for s in (b, c, b, c, b, c)]
    barrier = threading.Barrier(len(jobs))

    def hit(job):
        server, name = job
        barrier.wait(60)
        try:
            r = _complete_ids(server, name, cw["ids"])
            return server.name, name, r.status_code, (_first_top(r.json()) if r.status_code == 200 else r.text[:200])
        except Exception as exc:  # noqa: BLE001
            return server.name, name, "exception", repr(exc)

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(hit, jobs))
    elapsed = time.monotonic() - t0
    bad = [r for r in results if r[2] != 200]
    assert not bad, bad
    m1 = [s.metrics() for s in (b, c)]
    per_server = [m1[i].projections() - m0[i].projections() for i in range(2)]
    total = sum(per_server)
    print(
        f"\n[hardening] replicas: {len(jobs)} concurrent requests for {N_REPLICA} new adapters on 2 servers sharing "
        f"one cache: all 200 in {elapsed:.1f}s; projections B={per_server[0]:g} C={per_server[1]:g} total={total:g} "
        f"(distinct contents {N_REPLICA})"
    )
    assert total <= 2 * N_REPLICA
    assert total == N_REPLICA, "the same content was projected by both servers (no cross-process single-flight)"
    by_name: dict[str, list[dict]] = {}
    for _, name, _, top in results:
        by_name.setdefault(name, []).append(top)
    for name, tops in by_name.items():
        for t in tops[1:]:
            assert set(t) == set(tops[0]), name
            assert max(abs(t[k] - tops[0][k]) for k in t) < SAME_TOL, name
    count, problems = hs.cache_consistency(cw["cache"])
    assert not problems, problems
    assert b.healthy() and c.healthy()
