"""Offline ``vllm.LLM`` with the plugin (one subprocess run, shared by both tests).

4. ``LLM.generate(..., lora_request=LoRARequest('x', 1, <raw adapter>))`` serves the
   projected adapter (compared with transformers + peft on the projection).
10. Nothing that is not a verified cache entry reaches the worker: the front end refuses
    a path outside adapter_dirs, and the worker itself refuses (engine core called
    directly) a raw adapter, a forged entry outside the cache and a tampered entry.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("offline_llm_script.py")
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def offline_run(e2e_world, e2e, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("offline_llm")
    cache_dir = workdir / "cache"
    config = e2e_world.config(workdir / "offline.yaml", cache_dir)
    spec = {
        "model": str(e2e_world.aligned),
        "max_lora_rank": e2e.MAX_LORA_RANK,
        "token_ids": e2e_world.token_ids,
        "raw_adapter": str(e2e_world.adapters["offline/raw"]),
        "outside_adapter": str(e2e_world.outside_adapter),
        "workdir": str(workdir),
        "out": str(workdir / "result.json"),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    rc, log = e2e.run_to_exit(
        [sys.executable, str(SCRIPT), str(workdir / "spec.json")],
        e2e.plugin_env(config),
        workdir / "offline.log",
        TIMEOUT_S,
    )
    result = json.loads(Path(spec["out"]).read_text()) if Path(spec["out"]).exists() else {}
    if rc != 0 or not result.get("done"):
        pytest.fail(
            f"offline LLM run failed (exit {rc}); result so far {json.dumps(result)[:3000]}\nlog tail:\n"
            + "\n".join(log.splitlines()[-60:])
        )
    return {"result": result, "cache_dir": cache_dir, "log": log}


def test_offline_generate_serves_projected_adapter(offline_run, e2e_world, peft_reference, e2e):
    res = offline_run["result"]
    name = "offline/raw"
    raw, projected = e2e_world.adapters[name], e2e_world.projected(name)
    top = {int(t): lp for t, lp in res["generate"]["first_top"].items()}
    ref_proj = peft_reference.next_token_logprobs(projected)
    e2e.assert_matches_reference(top, ref_proj, 1e-3, "offline LLM vs projected reference")
    assert e2e.max_logprob_gap(top, peft_reference.next_token_logprobs(raw)) > 0.05, (
        "offline LLM served the raw adapter"
    )
    assert e2e.max_logprob_gap(top, peft_reference.next_token_logprobs(None)) > 0.02, "offline LLM applied no adapter"
    assert res["generate"]["token_ids"] == peft_reference.greedy(projected, 8)

    # The request went to a cache entry of the offline process's own cache.
    entry = Path(res["service_loaded"]["offline/raw"])
    assert entry.parent == offline_run["cache_dir"] / "entries"
    report = json.loads((entry / "safelora_report.json").read_text())
    assert report["summary"]["output_hash"] == e2e_world.offline_report(name).summary.output_hash
    assert res["generate_again"] == res["generate"]


def test_worker_only_loads_verified_cache_entries(offline_run):
    res = offline_run["result"]
    outside = res["add_lora_outside"]
    assert not outside["ok"], outside
    assert "outside the configured adapter_dirs" in outside["message"] and "evil" in outside["message"], outside

    for key, lora_name in (
        ("core_add_lora_raw", "raw"),
        ("core_add_lora_forged", "forged"),
        ("core_add_lora_tampered", "tampered"),
    ):
        attempt = res[key]
        assert not attempt["ok"], (key, attempt)
        text = attempt["message"] + attempt["traceback"]
        assert "not an intact entry of the patched-adapter cache" in text, (key, text)
        assert f"'{lora_name}'" in text, (key, text)
    # None of the refused adapters was loaded; the projected one still is.
    assert res["loaded_ids"] == [1], res["loaded_ids"]
    assert "failed verification" in offline_run["log"]  # the tampered entry is reported in the log
    assert res["tampered_entry_removed"]  # ... removed, and rebuilt for the next request:
    assert res["generate_again"] == res["generate"]
