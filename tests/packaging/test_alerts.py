"""The chart's alert rules under promtool: they parse, each alert fires on a failing series and stays quiet
on healthy ones, each has a runbook, and the chart ships them with the thresholds its values set."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart
from support.jobs import ROOT
from support.prometheus import RULES, binary

RULES_TEST = ROOT / "tests/prometheus/rules-test.yaml"
CHART = ROOT / "charts/kubeforge"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def rendered(values: dict[str, Any]) -> dict[str, str]:
    """The chart's manifests by template path."""
    return Chart.load(CHART).render(values, name="kf", namespace="monitoring")


def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout


def test_each_alert_fires_on_failing_series_and_stays_quiet_on_healthy_ones() -> None:
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has at least one case where it fires and one where it must not.
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    defined = set(alerts(yaml.safe_load(RULES.read_text())["groups"]))
    assert firing == quiet == defined


def test_each_alert_has_a_runbook_in_the_docs() -> None:
    runbooks = (ROOT / "docs/alerts.md").read_text()
    headings = set(re.findall(r"^## (\w+)$", runbooks, re.MULTILINE))
    for name, rule in alerts(yaml.safe_load(RULES.read_text())["groups"]).items():
        assert name in headings, f"docs/alerts.md has no section for {name}"
        section = runbooks.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert section.strip().startswith("Runbook:"), name
        assert rule["annotations"]["runbook_url"].endswith(f"docs/alerts.md#{name.lower()}")
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_the_chart_ships_the_tested_rules_with_its_thresholds(tmp_path: Path) -> None:
    off_by_default = rendered({})
    assert not off_by_default["kubeforge/templates/prometheusrule.yaml"].strip()
    assert not off_by_default["kubeforge/templates/grafana-dashboard.yaml"].strip()

    shipped = yaml.safe_load(rendered({"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}})[
        "kubeforge/templates/prometheusrule.yaml"])
    assert shipped["kind"] == "PrometheusRule" and shipped["apiVersion"] == "monitoring.coreos.com/v1"
    assert shipped["metadata"]["labels"]["release"] == "kps"
    # With default values the PrometheusRule holds exactly what promtool tested.
    assert shipped["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]

    values = {"prometheusRule": {"enabled": True, "pendingMinutes": 60, "stalledMinutes": 45}}
    tuned = yaml.safe_load(rendered(values)["kubeforge/templates/prometheusrule.yaml"])["spec"]["groups"]
    rules = alerts(tuned)
    assert rules["KubeforgeJobStuckPending"]["for"] == "60m"
    assert "> 45 * 60" in rules["KubeforgeTrainingStalled"]["expr"]
    groups = tmp_path / "rendered-rules.yaml"
    groups.write_text(yaml.safe_dump({"groups": tuned}))
    checked = promtool("check", "rules", str(groups))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_chart_ships_the_dashboard_for_grafanas_sidecar() -> None:
    values = {"grafanaDashboard": {"enabled": True, "namespace": "grafana"}}
    config_map = yaml.safe_load(rendered(values)["kubeforge/templates/grafana-dashboard.yaml"])
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {
        "kubeforge-jobs.json": (ROOT / "charts/kubeforge/files/grafana-dashboard.json").read_text().rstrip("\n")}
