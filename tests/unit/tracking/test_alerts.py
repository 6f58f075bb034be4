"""deploy/: the Prometheus alert rules pass `promtool test rules`, every rule has a test, and
every metric the rules and the Grafana dashboard query is one the relay exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from relay_milter.tracking.metrics import Snapshot, render
from support.factories import unavailable
from support.paths import REPO

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "relay-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "relay-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"
# Series from node-exporter itself (the textfile collector), not from the relay.
NODE_EXPORTER = {"node_textfile_mtime_seconds"}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool not installed (Debian package prometheus: deps/apt/tracking.txt)")
    return found


def test_rules_are_valid_and_their_tests_pass(promtool):
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_a_broken_expectation_fails(promtool, tmp_path):
    """The rule tests can fail: the same tests against rules with one threshold moved."""
    rules = RULES.read_text().replace("relay_queue_oldest_deferred_seconds > 4 * 3600", "relay_queue_oldest_deferred_seconds > 8 * 3600")
    (tmp_path / RULES.name).write_text(rules)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    run = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "RelayDeferredTooOld" in run.stdout + run.stderr


def test_every_rule_is_tested_firing():
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert rules == {"RelayTenantQueueGrowing", "RelayDeferredTooOld", "RelaySmarthostFailing",
                     "RelayWebhookBacklogGrowing", "RelayTrackerNotCommitting", "RelayCertificateExpiring"}
    fired = {case["alertname"] for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == rules


def exported() -> set[str]:
    """Every series name the relay writes, from a snapshot with every part present."""
    class Row:
        tenant = "acme"
        counts = {"deferred": 1}
        oldest_deferred_age = 5.0

    text = render(Snapshot(
        tenants=("acme",), node="relay1", event_counts={("acme", "RELAYED"): 1}, queue=[Row()],
        webhook_backlog={"acme": 1}, tracker_last_run=1.0,
        delays={"acme": {"buckets": {"+Inf": 1}, "sum": 1.0, "count": 1}}, certificates={"/etc/tenant-relay/tls/relay.pem": 2.0},  # a label value, never read
    ))
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def queried(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:relay|node)_[a-z_]+)\b", expr))
    return names


def test_every_queried_metric_is_exported():
    names = exported()
    assert {"relay_events_total", "relay_delivery_delay_seconds_bucket", "relay_tls_certificate_expiry_timestamp_seconds"} <= names
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    assert len(exprs) >= 9
    for expr in rules + exprs:
        missing = queried(expr) - names - NODE_EXPORTER
        assert not missing, f"{expr!r} queries {missing}, which the relay does not export"
