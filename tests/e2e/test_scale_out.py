"""Scale-up and scale-out: tensor parallelism on one host, replicas sharing adapter storage.

* ``--tensor-parallel-size 2`` (on this CPU with ``VLLM_CPU_OMP_THREADS_BIND="0|1"``): every
  rank runs its own worker process with its own copy of the guard; each must load the
  adapter only from the verified cache entry, and the served output is the projected one.
* Two replicas behind a LoRA-aware router share the adapter storage (``adapter_dirs``) but
  each has its own cache directory on its own host: content addressing makes them agree,
  the same entry digest and the same served bytes and outputs, without coordination.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.e2e

LOGPROB_TOL = 1e-3
NAME = "globex/random"  # low cosines: projected, and the projection keeps a visible update


def test_tensor_parallel_every_rank_guards_and_serves_projected(e2e_world, vllm_server_factory, peft_reference, e2e):
    cache_dir = e2e_world.root / "cache-tp2"
    config = e2e_world.config(e2e_world.root / "tp2.yaml", cache_dir)
    server = vllm_server_factory(
        "tp2",
        e2e_world.aligned,
        config,
        ["--tensor-parallel-size", "2"],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    try:
        served = e2e.complete(server, NAME, e2e_world.token_ids, max_tokens=8, logprobs=5)
        e2e.assert_matches_reference(
            served.first_top, peft_reference.next_token_logprobs(e2e_world.projected(NAME)), LOGPROB_TOL, "TP=2"
        )
        assert (
            e2e.max_logprob_gap(served.first_top, peft_reference.next_token_logprobs(e2e_world.adapters[NAME])) > 0.05
        )
        assert served.token_ids == peft_reference.greedy(e2e_world.projected(NAME), 8)
        entry = server.get(f"/safelora/v1/adapters/{NAME}").json()["cache_entry"]
        guarded = re.findall(
            rf"worker guard \(pid (\d+), tensor-parallel rank (\d+)\): adapter '{re.escape(NAME)}' loaded from "
            rf"verified cache entry {entry[:16]}",
            server.log_text(),
        )
        ranks = {rank for _, rank in guarded}
        pids = {pid for pid, _ in guarded}
        assert ranks == {"0", "1"} and len(pids) == 2, (guarded, server.log_tail())
    finally:
        server.stop()


def test_two_replicas_share_adapter_storage_not_the_cache(e2e_world, vllm_server_factory, e2e):
    replicas = []
    try:
        for i in range(2):
            cache_dir = e2e_world.root / f"cache-replica-{i}"
            config = e2e_world.config(e2e_world.root / f"replica-{i}.yaml", cache_dir)
            replicas.append((vllm_server_factory(f"replica-{i}", e2e_world.aligned, config), cache_dir))
        outputs, audits = [], []
        for server, cache_dir in replicas:
            outputs.append(e2e.complete(server, NAME, e2e_world.token_ids, max_tokens=8, logprobs=5))
            audits.append(server.get(f"/safelora/v1/adapters/{NAME}").json())
            assert e2e.cache_entries(cache_dir) == {audits[-1]["cache_entry"]}
        a, b = audits
        assert a["cache_entry"] == b["cache_entry"], "content addressing: both replicas name the entry alike"
        assert a["summary"]["output_hash"] == b["summary"]["output_hash"], "both serve the same bytes"
        assert outputs[0].token_ids == outputs[1].token_ids
        assert max(abs(outputs[0].first_top[t] - outputs[1].first_top[t]) for t in outputs[0].first_top) < 1e-5
        (_, cache_a), (_, cache_b) = replicas
        entry = a["cache_entry"]
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (cache_a / "entries" / entry / f).read_bytes() == (cache_b / "entries" / entry / f).read_bytes()
    finally:
        for server, _ in replicas:
            server.stop()
