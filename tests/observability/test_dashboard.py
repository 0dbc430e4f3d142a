"""configs/grafana-dashboard.json, statically: the fields Grafana needs to import it and draw
every panel, and queries that use only the plugin's metrics and known Grafana variables.
(tests/e2e/test_prometheus_live.py runs every query through a real Prometheus.)"""

from __future__ import annotations

from collections import Counter

from observability_support import (
    dashboard_queries,
    grafana_expand,
    load_dashboard,
    metric_names_in,
    plugin_sample_names,
)

# Panels drawn from numbers need a unit; heatmaps take theirs from the y axis.
NEEDS_UNIT = {"stat", "timeseries", "gauge", "bargauge"}


def test_dashboard_has_what_grafana_needs():
    d = load_dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert all(isinstance(i, int) for i in ids)
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    assert not dupes, f"duplicate panel ids {dupes}"
    for p in d["panels"]:
        where = f"panel {p['id']} {p['title']!r}"
        assert p["type"] and p["title"], where
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), where
        assert 0 < p["gridPos"]["w"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, where
        if p["type"] in NEEDS_UNIT:
            assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{where} has no unit"
        if p["type"] == "heatmap":
            assert p["options"]["yAxis"]["unit"], where
            assert all(t.get("format") == "heatmap" for t in p["targets"]), where
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), f"{where}: targets need unique refIds"


def test_panels_do_not_overlap():
    cells = {}
    for p in load_dashboard()["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]


def test_queries_use_exported_metrics_and_known_variables():
    exported = plugin_sample_names()
    queries = dashboard_queries(load_dashboard())
    assert queries
    for panel, target in queries:
        expr = grafana_expand(target["expr"])
        unknown = metric_names_in(expr) - exported
        assert not unknown, f"panel {panel['id']} {target['refId']}: {unknown} are not exported by the plugin"


def test_every_plugin_metric_is_on_the_dashboard():
    used = set().union(*(metric_names_in(t["expr"]) for _, t in dashboard_queries(load_dashboard())))
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    exported = {n for n in plugin_sample_names() if not n.endswith(("_created", "_sum", "_count"))}
    # A deprecated alias needs no panel of its own: its current name has one.
    from vllm_safelora.metrics import DEPRECATED_ALIASES

    missing = {
        n
        for n in exported
        if n.removesuffix("_total").removesuffix("_bucket") not in families | set(DEPRECATED_ALIASES)
    }
    assert not missing, f"metrics with no panel: {sorted(missing)}"
