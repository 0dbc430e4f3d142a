"""Shared by the observability tests (and tests/e2e/test_prometheus_live.py): paths, the sample names the
plugin exports, and the dashboard's queries as Grafana would send them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS = REPO_ROOT / "configs" / "prometheus-alerts.yaml"
DASHBOARD = REPO_ROOT / "configs" / "grafana-dashboard.json"
ALERT_TESTS = Path(__file__).with_name("prometheus-alerts.test.yaml")
_METRIC = re.compile(r"\b(safelora_[a-z_]+)")


def plugin_sample_names() -> set[str]:
    """Every sample name vllm_safelora.metrics exports (counter _total, histogram _bucket/_sum/_count, ...)."""
    from prometheus_client.metrics import MetricWrapperBase

    from vllm_safelora import metrics

    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                suffixes = {
                    "counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",),
                    "summary": ("", "_sum", "_count"),
                }.get(family.type, ("",))
                names |= {family.name + s for s in suffixes}
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def load_dashboard() -> dict:
    import json

    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel (rows' nested panels included)."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p, t) for t in p.get("targets", [])]
    return out


# What Grafana substitutes before sending a query, for a dashboard time range of RANGE
# and Prometheus scraping every SCRAPE: $__rate_interval = max($__interval + scrape, 4 x scrape).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval_ms": "15000",
    "$__interval": "15s",
    "$__range_ms": "300000",
    "$__range_s": "300",
    "$__range": "5m",
}
_VARIABLE = re.compile(r"\$(?:\{[^}]+\}|__\w+|\w+)")


def grafana_expand(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    """The query as Grafana sends it; raises on a variable Grafana would not fill in here."""
    for name in sorted(variables, key=len, reverse=True):  # $__interval_ms before $__interval
        expr = expr.replace(name, variables[name])
    left = _VARIABLE.findall(expr)
    if left:
        raise ValueError(f"unknown dashboard variables {left} in {expr!r}")
    return expr


def tool_or_skip(name: str, purpose: str) -> str:
    """Path of a Prometheus binary, or skip the test saying how to get it (never silently)."""
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} not found: install Debian's prometheus package (`apt-get install prometheus`, which "
            f".ci/setup-env does where apt-get is available) {purpose}"
        )
    return path
