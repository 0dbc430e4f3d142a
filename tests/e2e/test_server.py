"""One real vLLM OpenAI server with the plugin, shared by every test in this module.

Every adapter path vLLM offers must serve the *projected* adapter: the resolver
(a request naming an unknown model), POST /v1/load_lora_adapter, static
--lora-modules. The served behaviour is compared with transformers + peft run
in-process on the same tiny model (greedy next-token logprobs), with the offline
projection (CLI / Python API) and never with the raw upload.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.e2e

STATIC_NAME = "static/lora"  # served under its location (served_names: location, the default)
LOGPROB_TOL = 1e-3  # served vs transformers+peft, float32 on CPU
SAME_TOL = 1e-5  # two served copies of the same weights
DIFFERENT = 0.05  # projected vs unprojected must differ by at least this much somewhere
FROM_BASE = 0.02  # a (random) projected adapter vs no adapter at all


@pytest.fixture(scope="module")
def cache_dir(e2e_world) -> Path:
    return e2e_world.root / "cache-shared-server"


@pytest.fixture(scope="module")
def server(e2e_world, vllm_server_factory, cache_dir):
    config = e2e_world.config(e2e_world.root / "shared-server.yaml", cache_dir)
    static = f"{STATIC_NAME}={e2e_world.adapters['static/lora']}"
    srv = vllm_server_factory("shared", e2e_world.aligned, config, ["--lora-modules", static])
    yield srv
    srv.stop()  # free the CPUs for the next module's processes


def served_models(server) -> dict[str, dict]:
    r = server.get("/v1/models")
    r.raise_for_status()
    return {m["id"]: m for m in r.json()["data"]}


def assert_is_cache_entry(path: str, cache_dir: Path) -> None:
    p = Path(path)
    assert p.parent == cache_dir / "entries", f"{path} is not an entry of {cache_dir}"
    assert (p / "cache_entry.json").is_file()


def assert_projected_not_raw(e2e, peft_reference, served, projected_dir: Path, raw_dir: Path, what: str) -> None:
    ref_proj = peft_reference.next_token_logprobs(projected_dir)
    ref_raw = peft_reference.next_token_logprobs(raw_dir)
    # Precondition: the projection changes the model's behaviour measurably.
    assert float((ref_proj - ref_raw).abs().max()) > DIFFERENT, f"{what}: projection barely changes the adapter"
    e2e.assert_matches_reference(served.first_top, ref_proj, LOGPROB_TOL, what=f"{what} vs projected reference")
    gap_raw = e2e.max_logprob_gap(served.first_top, ref_raw)
    assert gap_raw > DIFFERENT, f"{what}: served logprobs match the UNPROJECTED adapter (gap {gap_raw:.2e})"
    ref_base = peft_reference.next_token_logprobs(None)
    if float((ref_proj - ref_base).abs().max()) > FROM_BASE:
        # The projection keeps part of the update: the adapter really is applied.
        gap_base = e2e.max_logprob_gap(served.first_top, ref_base)
        assert gap_base > FROM_BASE, f"{what}: served logprobs are those of the model WITHOUT the adapter"
    # Greedy continuation (8 tokens) equals transformers+peft's greedy decoding of the projection.
    assert served.token_ids == peft_reference.greedy(projected_dir, len(served.token_ids)), what


def assert_same_completion(a, b, what: str) -> None:
    assert a.token_ids == b.token_ids, what
    assert a.text == b.text, what
    for pa, pb in zip(a.top_logprobs, b.top_logprobs):
        assert set(pa) == set(pb), what
        assert max(abs(pa[t] - pb[t]) for t in pa) < SAME_TOL, what


# --------------------------------------------------------------------------- 1. resolver


@pytest.mark.parametrize("name", ["globex/ortho", "globex/random"])
def test_resolver_serves_projected_adapter(server, e2e_world, peft_reference, e2e, cache_dir, name):
    """globex/ortho: the lowest cosines (its projection is almost a no-op); globex/random:
    low cosines, and its projection keeps a visible update (so 'adapter not applied' fails)."""
    ids = e2e_world.token_ids
    cli_copy = e2e_world.cli_projected[name]
    served = e2e.complete(server, name, ids, max_tokens=8, logprobs=5)
    assert len(served.token_ids) == 8
    assert_projected_not_raw(e2e, peft_reference, served, cli_copy, e2e_world.adapters[name], name)
    assert_is_cache_entry(served_models(server)[name]["root"], cache_dir)
    audit = server.get(f"/safelora/v1/adapters/{name}").json()
    assert audit["summary"]["outcome"] == "modified"

    # The same answer over plain HTTP.
    r = e2e.complete_http(server, name, ids, max_tokens=8, logprobs=5)
    assert r.status_code == 200, r.text
    assert_same_completion(served, e2e.completion_from_json(r.json()), "HTTP vs openai client")

    # The CLI-projected copy (`vllm-safelora project`), loaded by path, serves the same.
    by_path_name = cli_copy.relative_to(e2e_world.adapter_root).as_posix()  # its location
    r = server.post("/v1/load_lora_adapter", json={"lora_name": by_path_name, "lora_path": str(cli_copy)})
    assert r.status_code == 200, r.text
    # Projecting the projection again changes nothing, so what is served by path IS the CLI output.
    audit = server.get(f"/safelora/v1/adapters/{by_path_name}").json()
    assert audit["summary"]["outcome"] == "unchanged", audit["summary"]
    by_path = e2e.complete(server, by_path_name, ids, max_tokens=8, logprobs=5)
    assert_same_completion(served, by_path, "resolver vs offline-projected copy loaded by path")


# --------------------------------------------------------------------------- 2. load endpoint


def test_load_endpoint_projects_and_confines_paths(server, e2e_world, peft_reference, e2e, cache_dir):
    src = e2e_world.adapters["loadme/lora"]
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "loadme/lora", "lora_path": str(src)})
    assert r.status_code == 200, r.text
    models = served_models(server)
    assert_is_cache_entry(models["loadme/lora"]["root"], cache_dir)
    served = e2e.complete(server, "loadme/lora", e2e_world.token_ids, max_tokens=8, logprobs=5)
    assert_projected_not_raw(e2e, peft_reference, served, e2e_world.projected("loadme/lora"), src, "load endpoint")

    before = set(served_models(server))
    refusals = {
        # outside adapter_dirs
        "evil-outside": (str(e2e_world.outside_adapter), 400, "outside the configured adapter_dirs"),
        # spelled inside, resolves outside
        "evil-traversal": (
            str(e2e_world.adapter_root / ".." / "outside" / "evil"),
            400,
            "outside the configured adapter_dirs",
        ),
        # not a local path, and hub sources are disabled: never fetched
        "evil-hub": ("someorg/some-lora", 404, "hub sources are disabled"),
    }
    for lora_name, (path, status, why) in refusals.items():
        r = server.post("/v1/load_lora_adapter", json={"lora_name": lora_name, "lora_path": path})
        assert r.status_code == status, (lora_name, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert why in message and lora_name in message, message
    assert set(served_models(server)) == before

    # Through the openai client: a refused name stays unknown.
    with pytest.raises(openai.NotFoundError):
        e2e.complete(server, "evil-outside", e2e_world.token_ids, max_tokens=1)


# --------------------------------------------------------------------------- 3. static modules


def test_static_lora_module_is_projected(server, e2e_world, peft_reference, e2e, cache_dir):
    models = served_models(server)
    assert STATIC_NAME in models
    assert_is_cache_entry(models[STATIC_NAME]["root"], cache_dir)
    served = e2e.complete(server, STATIC_NAME, e2e_world.token_ids, max_tokens=8, logprobs=5)
    assert_projected_not_raw(
        e2e, peft_reference, served, e2e_world.projected("static/lora"), e2e_world.adapters["static/lora"], "static"
    )


# --------------------------------------------------------------------------- 5. cache


def test_same_content_under_two_names_is_projected_once(server, e2e_world, peft_reference, e2e, cache_dir):
    m0, entries0 = server.metrics(), e2e.cache_entries(cache_dir)
    first = e2e.complete(server, "cachet/one", e2e_world.token_ids)
    m1, entries1 = server.metrics(), e2e.cache_entries(cache_dir)
    second = e2e.complete(server, "cachet2/one", e2e_world.token_ids)
    m2, entries2 = server.metrics(), e2e.cache_entries(cache_dir)

    assert m1.value("safelora_projections_total") - m0.value("safelora_projections_total") == 1
    assert (
        m1.value("safelora_cache_requests_total", result="miss")
        - m0.value("safelora_cache_requests_total", result="miss")
        == 1
    )
    assert len(entries1 - entries0) == 1
    assert m2.value("safelora_projections_total") == m1.value("safelora_projections_total")
    assert (
        m2.value("safelora_cache_requests_total", result="hit")
        - m1.value("safelora_cache_requests_total", result="hit")
        == 1
    )
    assert entries2 == entries1

    assert_same_completion(first, second, "two names, same content")
    e2e.assert_matches_reference(
        second.first_top,
        peft_reference.next_token_logprobs(e2e_world.projected("cachet/one")),
        LOGPROB_TOL,
        "cache hit",
    )
    a = server.get("/safelora/v1/adapters/cachet/one").json()
    b = server.get("/safelora/v1/adapters/cachet2/one").json()
    assert a["cache_entry"] == b["cache_entry"] and a["cache_entry"] in entries1 - entries0


def test_changed_upload_after_unload_is_projected_again(server, e2e_world, peft_reference, e2e, cache_dir):
    name = "swap/lora"
    target = e2e_world.adapters[name]
    old = e2e.complete(server, name, e2e_world.token_ids)
    projected_v1 = e2e_world.projected(name)  # before the upload replaces the files
    e2e.assert_matches_reference(
        old.first_top, peft_reference.next_token_logprobs(projected_v1), LOGPROB_TOL, "upload v1"
    )
    old_audit = server.get(f"/safelora/v1/adapters/{name}").json()
    m0, entries0 = server.metrics(), e2e.cache_entries(cache_dir)

    r = server.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200, r.text
    assert name not in served_models(server)
    # the audit API forgets it too
    assert server.get(f"/safelora/v1/adapters/{name}").status_code == 404
    # The tenant uploads new weights under the same name (file by file, atomically).
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        tmp = target / f".{f}.upload"
        shutil.copyfile(e2e_world.swap_replacement / f, tmp)
        os.replace(tmp, target / f)

    new = e2e.complete(server, name, e2e_world.token_ids)
    m1, entries1 = server.metrics(), e2e.cache_entries(cache_dir)
    new_audit = server.get(f"/safelora/v1/adapters/{name}").json()

    assert m1.value("safelora_projections_total") - m0.value("safelora_projections_total") == 1
    assert len(entries1 - entries0) == 1
    assert new_audit["cache_entry"] != old_audit["cache_entry"]
    assert new_audit["cache_entry"] in entries1 - entries0
    assert new_audit["summary"]["input_hash"] != old_audit["summary"]["input_hash"]
    projected_v2 = e2e_world.projected("swap/lora@v2", src=e2e_world.swap_replacement)
    assert_projected_not_raw(e2e, peft_reference, new, projected_v2, e2e_world.swap_replacement, "re-upload")
    # ... and no longer the first upload's projection.
    assert e2e.max_logprob_gap(new.first_top, peft_reference.next_token_logprobs(projected_v1)) > FROM_BASE


# --------------------------------------------------------------------------- 6. refusals


@pytest.mark.parametrize(
    "which, reason, why",
    [
        ("nan_name", "non_finite", "NaN or Inf"),
        ("other_base_name", "base_model_mismatch", "/models/some-other-llama"),
    ],
)
def test_refused_adapter_gets_4xx_and_is_counted(server, e2e_world, e2e, cache_dir, which, reason, why):
    name = getattr(e2e_world, which)
    m0, entries0 = server.metrics(), e2e.cache_entries(cache_dir)

    r = e2e.complete_http(server, name, e2e_world.token_ids, max_tokens=1)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert name in message and reason in message, message
    assert why.lower() in message.lower(), message
    m1 = server.metrics()
    assert m1.value("safelora_refusals_total", reason=reason) - m0.value("safelora_refusals_total", reason=reason) == 1
    assert (
        m1.value("safelora_adapters_total", outcome="refused") - m0.value("safelora_adapters_total", outcome="refused")
        == 1
    )

    with pytest.raises(openai.APIStatusError) as info:
        e2e.complete(server, name, e2e_world.token_ids, max_tokens=1)
    assert 400 <= info.value.status_code < 500 and name in str(info.value.message)

    assert e2e.cache_entries(cache_dir) == entries0, "a refused adapter left a cache entry"
    assert name not in served_models(server)
    # The server keeps serving everyone else.
    ok = e2e.complete(server, "acme/aligned", e2e_world.token_ids, max_tokens=2)
    assert len(ok.token_ids) == 2


# --------------------------------------------------------------------------- 7. metrics


METRIC_FAMILIES = {
    "safelora_adapters": "counter",
    "safelora_refusals": "counter",
    "safelora_rejections": "counter",
    "safelora_module_cosine": "histogram",
    "safelora_modules_projected": "counter",
    "safelora_projection_seconds": "histogram",
    "safelora_cache_requests": "counter",
    "safelora_bank_bytes": "gauge",
}


def test_metrics_exist_and_move(server, e2e_world, e2e):
    m0 = server.metrics()
    for family, kind in METRIC_FAMILIES.items():
        assert m0.has_family(family), f"{family} missing from /metrics"
        assert m0.families[family].type == kind, (family, m0.families[family].type)
    status = server.get("/safelora/v1/status").json()
    assert m0.value("safelora_bank_bytes", device="cpu") == status["bank_bytes"] > 0

    name = "metrics/lora"
    report = e2e_world.offline_report(name)
    assert report.summary.outcome == "modified" and report.summary.projected > 0
    e2e.complete(server, name, e2e_world.token_ids, max_tokens=2)
    m1 = server.metrics()

    def delta(a, b, sample, **labels):
        return b.value(sample, **labels) - a.value(sample, **labels)

    assert delta(m0, m1, "safelora_adapters_total", outcome="modified", policy="safelora") == 1
    assert delta(m0, m1, "safelora_projections_total", policy="safelora") == 1
    assert delta(m0, m1, "safelora_modules_projected_total") == report.summary.projected
    assert delta(m0, m1, "safelora_module_cosine_count") == report.summary.modules
    expected_le = [m.cosine for m in report.modules]
    for bound in ("0.1", "0.35", "1.0"):
        assert delta(m0, m1, "safelora_module_cosine_bucket", le=bound) == sum(c <= float(bound) for c in expected_le)
    assert delta(m0, m1, "safelora_projection_seconds_count") == 1
    assert delta(m0, m1, "safelora_projection_seconds_sum") > 0
    assert delta(m0, m1, "safelora_cache_requests_total", result="miss") == 1

    # A request for an adapter that is already loaded does not count again.
    e2e.complete(server, name, e2e_world.token_ids, max_tokens=2)
    m2 = server.metrics()
    for sample in ("safelora_adapters_total", "safelora_projections_total", "safelora_cache_requests_total"):
        assert m2.value(sample) == m1.value(sample), sample

    # An adapter the policy leaves alone counts as "unchanged" and projects nothing.
    fresh = "acme/aligned" not in served_models(server)
    e2e.complete(server, "acme/aligned", e2e_world.token_ids, max_tokens=2)
    m3 = server.metrics()
    assert delta(m2, m3, "safelora_adapters_total", outcome="unchanged") == (1 if fresh else 0)
    assert delta(m2, m3, "safelora_modules_projected_total") == 0

    # A refusal moves rejections{reason} and adapters{outcome="refused"}.
    r = e2e.complete_http(server, e2e_world.nan_name, e2e_world.token_ids, max_tokens=1)
    assert r.status_code == 400
    m4 = server.metrics()
    assert delta(m3, m4, "safelora_refusals_total", reason="non_finite") == 1
    assert delta(m3, m4, "safelora_adapters_total", outcome="refused") == 1
    assert {"reason": "non_finite"} in m4.labelsets("safelora_refusals_total")
    labelsets = m4.labelsets("safelora_adapters_total")
    assert labelsets and all({"outcome", "policy"} <= set(ls) for ls in labelsets), labelsets


# --------------------------------------------------------------------------- 8. audit


def test_audit_route_matches_offline_report(server, e2e_world, e2e, cache_dir):
    name = "globex/ortho"
    e2e.complete(server, name, e2e_world.token_ids, max_tokens=1)
    r = server.get(f"/safelora/v1/adapters/{name}")
    assert r.status_code == 200, r.text
    served = r.json()
    offline = e2e_world.offline_report(name).model_dump(mode="json")
    import json

    cli_report = json.loads((e2e_world.cli_projected[name] / "safelora_report.json").read_text())

    assert served["served_as"] == name
    assert served["cache_entry"] in e2e.cache_entries(cache_dir)
    for ref in (offline, cli_report):
        assert [m["module"] for m in served["modules"]] == [m["module"] for m in ref["modules"]]
        for sm, rm in zip(served["modules"], ref["modules"]):
            assert sm["projected"] == rm["projected"], sm["module"]
            assert sm["cosine"] == rm["cosine"], sm["module"]
            assert sm["cosine_raw"] == pytest.approx(rm["cosine_raw"], abs=1e-9), sm["module"]
            assert sm["shape"] == rm["shape"] and sm["rank"] == rm["rank"]
        for key in (
            "outcome",
            "modules",
            "projected",
            "policy_name",
            "policy",
            "policy_id",
            "bank_id",
            "input_hash",
            "output_hash",
            "min_cosine",
        ):
            assert served["summary"][key] == ref["summary"][key], key
    assert served["summary"]["outcome"] == "modified"
    assert all(m["projected"] for m in served["modules"])

    listing = server.get("/safelora/v1/adapters").json()
    assert listing[name]["cache_entry"] == served["cache_entry"]
    assert listing[name]["output_hash"] == offline["summary"]["output_hash"]
    status = server.get("/safelora/v1/status").json()
    assert status["bank_id"] == offline["summary"]["bank_id"]
    assert status["aligned_model"] == str(e2e_world.aligned)
    assert server.get("/safelora/v1/adapters/never/loaded").status_code == 404


def test_plugin_log_lines_reach_the_server_log(server, e2e_world, e2e):
    e2e.complete_http(server, e2e_world.nan_name, e2e_world.token_ids, max_tokens=1)
    log = server.log_text()
    assert "safelora: protecting" in log, server.log_tail()
    assert f"adapter '{e2e_world.nan_name}' refused (non_finite)" in log, server.log_tail()
