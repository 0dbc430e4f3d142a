"""Shared by the observability tests (and tests/e2e/test_prometheus_live.py): paths, the sample names the
plugin exports, and the dashboard's queries as Grafana would send them."""

from __future__ import annotations

import re
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
                suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                            "gauge": ("",), "summary": ("", "_sum", "_count")}.get(family.type, ("",))
                names |= {family.name + s for s in suffixes}
    return names


def metric_names_in(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))
