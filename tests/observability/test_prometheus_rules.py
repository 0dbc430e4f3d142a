"""configs/prometheus-alerts.yaml: valid for Prometheus (promtool check rules), every alert
unit-tested firing and silent (promtool test rules), and only metrics the plugin exports."""

from __future__ import annotations

import subprocess

import yaml

from observability_support import ALERT_TESTS, ALERTS, metric_names_in, plugin_sample_names

# What an operator wires first, and the saturation metrics.
REQUIRED_ALERTS = {
    "SafeLoRAPluginAbsent",
    "SafeLoRAGuardEvent",
    "SafeLoRARejectionSpike",
    "SafeLoRAProjectionSlow",
    "SafeLoRACacheOverBudget",
    "SafeLoRAPrepareSaturated",
    "SafeLoRAOverloaded",
    "SafeLoRARefusedAdapterHammered",
}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules(promtool):
    res = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in res.stdout


def test_promtool_unit_tests(promtool):
    res = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ALERT_TESTS.parent),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_shipped_and_unit_tested_firing():
    alerts = {r["alert"] for r in _rules()}
    assert REQUIRED_ALERTS <= alerts, REQUIRED_ALERTS - alerts
    fired = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired, f"alerts without a firing unit test: {alerts - fired}"
    for rule in _rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_rules_name_only_metrics_the_plugin_exports():
    exported = plugin_sample_names()
    for rule in _rules():
        unknown = metric_names_in(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} uses metrics the plugin does not export: {unknown}"
