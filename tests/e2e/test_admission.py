"""Admission rules on a real server: refuse adapters that needed too much projection.

A second server (the only other one that gets as far as loading the model) runs with
``admission.max_projected_fraction: 0.5``: ``admit/ortho`` needs every module projected
and is refused with 403; ``admit/mixed`` (q_proj low-cosine, v_proj aligned) needs
exactly half and is served, projected.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cache_dir(e2e_world):
    return e2e_world.root / "cache-admission-server"


@pytest.fixture(scope="module")
def admission_server(e2e_world, vllm_server_factory, cache_dir):
    config = e2e_world.config(
        e2e_world.root / "admission-server.yaml",
        cache_dir,
        admission={"max_projected_fraction": 0.5, "min_cosine": None},
    )
    srv = vllm_server_factory("admission", e2e_world.aligned, config)
    yield srv
    srv.stop()


def test_admission_refuses_fully_projected_adapter(admission_server, e2e_world, peft_reference, e2e, cache_dir):
    srv = admission_server
    name = "admit/ortho"
    report = e2e_world.offline_report(name)
    assert report.summary.projected == report.summary.modules  # precondition: 100% projected

    m0, entries0 = srv.metrics(), e2e.cache_entries(cache_dir)
    r = e2e.complete_http(srv, name, e2e_world.token_ids, max_tokens=1)
    assert r.status_code == 403, r.text
    message = r.json()["error"]["message"]
    assert name in message and "admission" in message and "needed projection" in message, message
    m1 = srv.metrics()
    assert (
        m1.value("safelora_refusals_total", reason="admission")
        - m0.value("safelora_refusals_total", reason="admission")
        == 1
    )

    # The same verdict through the load endpoint, with the path under adapter_dirs.
    r = srv.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(e2e_world.adapters[name])})
    assert r.status_code == 403, r.text
    assert name in r.json()["error"]["message"]
    assert e2e.cache_entries(cache_dir) == entries0, "a refused adapter left a cache entry"
    models = {m["id"] for m in srv.get("/v1/models").json()["data"]}
    assert name not in models

    # Within the limit (2 of 4 modules projected): served, and projected.
    mixed = e2e_world.mixed_name
    served = e2e.complete(srv, mixed, e2e_world.token_ids, max_tokens=4)
    audit = srv.get(f"/safelora/v1/adapters/{mixed}").json()
    assert audit["summary"]["outcome"] == "modified"
    assert audit["summary"]["projected"] * 2 == audit["summary"]["modules"]
    assert {m["module"].split(".")[-1] for m in audit["modules"] if m["projected"]} == {"q_proj"}
    e2e.assert_matches_reference(
        served.first_top, peft_reference.next_token_logprobs(e2e_world.projected(mixed)), 1e-3, "mixed adapter"
    )
    assert e2e.max_logprob_gap(served.first_top, peft_reference.next_token_logprobs(e2e_world.adapters[mixed])) > 0.05
    status = srv.get("/safelora/v1/status").json()
    assert status["admission"]["max_projected_fraction"] == 0.5
