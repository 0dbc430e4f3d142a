"""A real Prometheus scrapes a live plugin server; every dashboard query and alert rule runs on it.

Observability end to end:

* the bank is built by the CLI from a RELATIVE --aligned path (the issue's case) and the
  server runs from another directory with the ABSOLUTE path as --model: it must start;
* Prometheus (Debian's package; skipped with the reason when it is not installed) scrapes
  the server every second over loopback, with configs/prometheus-alerts.yaml loaded;
* traffic: a projected adapter, an unchanged one, two refused ones, a cache hit;
* every query of configs/grafana-dashboard.json, with Grafana's variables substituted,
  goes through Prometheus' HTTP API and must parse and return the series its panel
  draws; every alert rule must evaluate without error, and "plugin absent" must not fire.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "observability"))  # shared dashboard helpers
from observability_support import ALERTS, dashboard_queries, grafana_expand, load_dashboard, tool_or_skip  # noqa: E402

from vllm_safelora.launcher import kill_tree, spawn  # noqa: E402

pytestmark = pytest.mark.e2e

SCRAPE = "1s"
PROMETHEUS_START_TIMEOUT_S = 60

# (panel title, refId) -> label values the result must contain (beyond being non-empty).
EXPECTED_LABELS = {
    ("Bank bytes", "A"): {"device": {"cpu"}},
    ("Adapter loads by outcome", "A"): {"outcome": {"modified", "unchanged", "refused"}},
    ("Rejections by reason", "A"): {"reason": {"non_finite", "base_model_mismatch"}},
    ("Cache lookups", "A"): {"result": {"hit", "miss"}},
    ("Module cosine distribution (per projection)", "A"): {"le": {"0.35", "+Inf"}},
}


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return tool_or_skip("prometheus", "to run the dashboard and the alert rules against a live server")


@pytest.fixture(scope="module")
def relative_bank(e2e_world, tmp_path_factory) -> Path:
    """`vllm-safelora build-bank --aligned <relative path>`, as a new user types it."""
    work = tmp_path_factory.mktemp("relative_bank")
    cwd = Path(e2e_world.aligned).parent.parent
    rel_base = os.path.relpath(e2e_world.base, cwd)
    rel_aligned = os.path.relpath(e2e_world.aligned, cwd)
    assert not os.path.isabs(rel_aligned) and "/" in rel_aligned
    out = work / "bank"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_safelora.cli",
            "build-bank",
            "--base",
            rel_base,
            "--aligned",
            rel_aligned,
            "--out",
            str(out),
            "--modules",
            "q_proj,v_proj",
        ],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def server(e2e_world, relative_bank, vllm_server_factory, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus_server")
    config = e2e_world.config(work / "safelora.yaml", work / "cache", bank=relative_bank)
    # The model by its absolute path; the server's working directory is elsewhere.
    return vllm_server_factory("prometheus", Path(e2e_world.aligned).resolve(), config)


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": "vllm", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.proc = spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            os.environ,
            self.log,
            die_with_parent=True,
        )

    def api(self, path: str, **params):
        import requests

        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.status_code} {body}"
        return body["data"]

    def wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"prometheus not ready after {PROMETHEUS_START_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}"
        )

    def wait_for(self, query: str, timeout_s: float = 60) -> list:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.api("query", query=query)["result"]
            if result:
                return result
            time.sleep(1)
        raise AssertionError(f"no data for {query!r} after {timeout_s:.0f}s")

    def stop(self) -> None:
        kill_tree(self.proc.pid, grace=15, reap=self.proc)


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, server, e2e, tmp_path_factory):
    prom = Prometheus(
        prometheus_bin, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.port}", e2e.free_port()
    )
    try:
        prom.wait_ready()
        prom.wait_for('up{job="vllm"} == 1')
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def traffic(server, prometheus, e2e_world, e2e):
    """Projected, unchanged, refused (twice: content and base model) and a cache hit; then two scrapes."""
    w = e2e_world
    statuses = {}
    for name in ("globex/random", "acme/aligned", "cachet/one", "cachet2/one", w.nan_name, w.other_base_name):
        statuses[name] = e2e.complete_http(server, name, w.token_ids, max_tokens=2).status_code
    assert statuses["globex/random"] == statuses["acme/aligned"] == 200, statuses
    assert statuses["cachet/one"] == statuses["cachet2/one"] == 200, statuses
    assert 400 <= statuses[w.nan_name] < 500 and 400 <= statuses[w.other_base_name] < 500, statuses
    m = server.metrics()  # prometheus_client's parser: what Prometheus is about to read
    assert m.value("safelora_cache_requests_total", result="hit") >= 1
    assert m.value("safelora_adapters_total", outcome="modified") >= 1
    prometheus.wait_for('sum(safelora_refusals_total{reason="base_model_mismatch"}) >= 1')
    time.sleep(3)  # a few more scrapes, so rates have two samples after the last change
    return statuses


def test_server_started_with_a_bank_built_from_a_relative_path(server, relative_bank, e2e_world):
    from vllm_safelora.bank import read_manifest

    manifest = read_manifest(relative_bank)
    assert not os.path.isabs(manifest.aligned.ref)
    assert manifest.aligned.path == str(Path(e2e_world.aligned).resolve())
    status = server.get("/safelora/v1/status").json()
    assert status["bank_id"] == manifest.bank_id


@pytest.mark.parametrize("panel_title, ref", [(p["title"], t["refId"]) for p, t in dashboard_queries(load_dashboard())])
def test_every_dashboard_query_returns_its_series(prometheus, traffic, panel_title, ref):
    panel, target = next(
        (p, t) for p, t in dashboard_queries(load_dashboard()) if p["title"] == panel_title and t["refId"] == ref
    )
    query = grafana_expand(target["expr"])
    data = prometheus.api("query", query=query)  # parses, or the API answers 400 with the error
    result = data["result"]
    assert result, f"panel {panel['id']} {panel_title!r} {ref}: {query!r} returned no series"
    # A range query is what a time-series panel sends; it must work at the panel's step too.
    now = time.time()
    ranged = prometheus.api("query_range", query=query, start=now - 120, end=now, step="15s")["result"]
    assert ranged, f"panel {panel_title!r} {ref}: no series over the last 2 minutes"
    for label, wanted in EXPECTED_LABELS.get((panel_title, ref), {}).items():
        got = {s["metric"].get(label) for s in result}
        assert wanted <= got, f"panel {panel_title!r} {ref}: {label} values {sorted(map(str, got))} lack {wanted - got}"


def test_alert_rules_evaluate_on_live_data(prometheus, traffic):
    groups = prometheus.api("rules", type="alert")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    shipped = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == shipped
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # The plugin is there, nothing bypassed it, its cache is within budget.
    for quiet in ("SafeLoRAPluginAbsent", "SafeLoRAGuardEvent", "SafeLoRACacheOverBudget"):
        assert rules[quiet]["state"] == "inactive", (quiet, rules[quiet]["alerts"])
    # The expressions themselves run on the live series (not only "no error").
    assert prometheus.api("query", query="count by (job, instance) (safelora_bank_bytes)")["result"]
