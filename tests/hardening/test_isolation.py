"""Isolation: a hostile-but-admitted adapter shares batches with other tenants and changes nothing of theirs.

Rows without a LoRA, next to a hostile one. The largest update the reader admits (max |s B A| just under the cap,
``hs.HOSTILE_MAX_UPDATE``, on every module, aligned with the alignment direction so no
policy shrinks it) is served on a plugin-enabled server; its requests are sent at the same
time as other tenants' (two adapters and the base model), so vLLM runs them in the same
batches (``--max-num-seqs 8``, ``--max-loras 4``: all 8 requests fit one step). The other
tenants' greedy token ids must equal a run without the hostile adapter, their logprobs
must match within the server's own batch-to-batch jitter (measured here: two runs without
the hostile one), and everything must be finite. Variants just over the limits are
refused with a 4xx, and the tenants are still served afterwards.

One server per dtype: float32 and bfloat16 (each ~60-90 s to start on 2 cores).
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

import hardening_support as hs
from support.server import Server, new_server

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello, the safety rule is", "The weather today"]
MAX_TOKENS = 8
# Logprob jitter allowed on top of the measured baseline jitter (batch shapes differ run to run).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def aligned_spike_tensors(
    template: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], fraction: float, scale: float
):
    """Every module's update = c u1 v1^T (V's top singular pair), max |s B A| = fraction x the cap.

    Aligned with the alignment subspace, its cosine is ~1: a threshold policy leaves it as it is,
    so what is served is exactly the largest update the reader admits.
    """
    out = {}
    for key, t in template.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        U, _, Vh = torch.linalg.svd(deltas[module].double(), full_matrices=False)
        u, v = U[:, 0], Vh[0]
        c = fraction * hs.HOSTILE_MAX_UPDATE / (scale * float(u.abs().max()) * float(v.abs().max()))
        A, B = torch.zeros_like(t), torch.zeros_like(template[key.replace("lora_A", "lora_B")])
        A[0], B[:, 0] = v.float(), (c * u).float()
        out[key], out[key.replace("lora_A", "lora_B")] = A, B
    return out


def complete(server: Server, model: str, prompt: str) -> dict:
    r = server.complete(model, prompt=prompt, max_tokens=MAX_TOKENS, logprobs=1, return_tokens_as_token_ids=True)
    if r.status_code != 200:
        return {"status": r.status_code, "text": r.text[:300]}
    lp = r.json()["choices"][0]["logprobs"]
    return {"status": 200, "tokens": lp["tokens"], "logprobs": lp["token_logprobs"]}


def concurrently(server: Server, calls: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """All requests at once (one thread each), so the scheduler batches them together."""
    results: dict[tuple[str, str], dict] = {}
    barrier = threading.Barrier(len(calls))

    def one(call):
        barrier.wait()
        results[call] = complete(server, *call)

    threads = [threading.Thread(target=one, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def max_logprob_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def iso_server(request, hardening_world, tiny_deltas, tmp_path_factory):
    dtype = request.param
    world = hardening_world
    work = tmp_path_factory.mktemp(f"isolation_{dtype}")
    root = world.adapter_root / f"iso-{dtype}"
    tenants = [f"iso-{dtype}/good{i}" for i in range(2)]
    for i, name in enumerate(tenants):
        hs.make_valid_adapter(world.adapter_root / name, world.template, seed=7000 + i)
    cfg, t0 = hs.load_template(world.template)
    cfg = {**cfg, "base_model_name_or_path": str(world.aligned)}
    scale = cfg["lora_alpha"] / cfg["r"]
    hs.write_adapter(root / "max", cfg, aligned_spike_tensors(t0, tiny_deltas, 0.98, scale))
    refused = {
        "over": (cfg, aligned_spike_tensors(t0, tiny_deltas, 1.05, scale), "the update s*B*A reaches"),
        "alpha": ({**cfg, "lora_alpha": 1e30}, hs.random_tensors(t0, seed=1), "lora_alpha is 1e+30"),
        "alpha-pattern": ({**cfg, "alpha_pattern": {"q_proj": 1e30}}, hs.random_tensors(t0, seed=2), "alpha_pattern"),
        "rslora": ({**cfg, "use_rslora": True}, aligned_spike_tensors(t0, tiny_deltas, 0.98, scale), "s*B*A reaches"),
        "f32-inf-in-16bit": (
            cfg,
            {k: (v * 0 + 3.0e38 if ".lora_B." in k else v) for k, v in hs.random_tensors(t0, 3).items()},
            "is not finite in" if dtype == "float32" else f"not finite in {dtype}",
        ),
    }
    for name, (c, t, _) in refused.items():
        hs.write_adapter(root / name, c, t)
    config = world.config(work / "iso.yaml", work / "cache")
    server = new_server(
        f"isolation-{dtype}", world.aligned, config, work, extra_args=["--dtype", dtype, "--max-loras", "3"]
    )
    server.start().wait_ready()
    try:
        yield server, dtype, tenants, f"iso-{dtype}/max", {f"iso-{dtype}/{k}": v[2] for k, v in refused.items()}
    finally:
        server.stop()


def test_admitted_hostile_adapter_leaves_other_tenants_unchanged(iso_server, hardening_world):
    server, dtype, tenants, hostile, _ = iso_server
    others = [*tenants, str(hardening_world.aligned)]  # two adapters and the base model
    tenant_calls = [(m, p) for m in others for p in PROMPTS]
    hostile_calls = [(hostile, p) for p in PROMPTS]
    # Load (and project) every adapter first, in this order: slots 0, 1 for the tenants, the
    # last slot (2 of --max-loras 3) for the hostile adapter.
    for model in [*others, hostile]:
        assert complete(server, model, PROMPTS[0])["status"] == 200, model

    base1 = concurrently(server, tenant_calls)
    mixed = [concurrently(server, tenant_calls + hostile_calls) for _ in range(2)]
    base2 = concurrently(server, tenant_calls)

    for run in (base1, base2, *mixed):
        for call, res in run.items():
            assert res["status"] == 200, (call, res)
            assert all(math.isfinite(x) for x in res["logprobs"]), (call, res)
    jitter = max(max_logprob_diff(base1[c], base2[c]) for c in tenant_calls)
    worst = 0.0
    for run in mixed:
        for c in tenant_calls:
            assert run[c]["tokens"] == base1[c]["tokens"], (c, run[c]["tokens"], base1[c]["tokens"])
            worst = max(worst, max_logprob_diff(run[c], base1[c]))
    hostile_tokens = {tuple(mixed[0][c]["tokens"]) for c in hostile_calls}
    print(
        f"\n[hardening] isolation ({dtype}): {len(tenant_calls)} tenant requests x {len(mixed)} mixed batches with "
        f"{len(hostile_calls)} requests of the largest admitted update ({0.98 * hs.HOSTILE_MAX_UPDATE:g}); tenant tokens "
        f"identical, max |logprob diff| {worst:.2e} (baseline jitter {jitter:.2e}); hostile outputs finite "
        f"({len(hostile_tokens)} distinct)"
    )
    assert worst <= jitter + TOLERANCE[dtype], (worst, jitter)
    # The hostile adapter really is the big one: its answers differ from the base model's.
    assert mixed[0][hostile_calls[0]]["tokens"] != base1[(str(hardening_world.aligned), PROMPTS[0])]["tokens"]


def test_variants_over_the_limits_are_refused_and_tenants_still_served(iso_server):
    server, dtype, tenants, _, refused = iso_server
    m0 = server.metrics()
    for name, fragment in refused.items():
        r = server.complete(name)
        assert r.status_code == 400 and "(update_overflow)" in r.text and fragment in r.text, (
            name,
            r.status_code,
            r.text[:400],
        )
        assert server.complete(tenants[0]).status_code == 200
    m1 = server.metrics()
    assert m1.refusals("update_overflow") - m0.refusals("update_overflow") == len(refused)
    # nothing of theirs is listed by the audit API
    listed = json.dumps(server.get("/safelora/v1/adapters").json())
    assert not any(name in listed for name in refused)
    assert server.healthy()
