"""Ops are told: the shipped alerting rules (config/prometheus/cxr-node-alerts.yml) pass `promtool check
rules` and their unit tests (every alert firing and not firing), and a real Prometheus scraping a real node
fires CxrQueueNotDraining while the node's worker cannot progress, and resolves it once the worker drains
the queue. The Grafana dashboard's queries run on that Prometheus and, like the rules, name only metrics
the node exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.harness import REPO, Node, chest_copies, dcmsend, free_port, stop_process, wait_for
from tests.test_faults import SOURCES

RULES = REPO / "config" / "prometheus" / "cxr-node-alerts.yml"
RULE_TESTS = REPO / "config" / "prometheus" / "cxr-node-alerts.test.yml"
DASHBOARD = REPO / "config" / "grafana" / "cxr-node-dashboard.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (Debian package `prometheus`)")
    return path


def alerts() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"][0]["rules"]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def test_every_alert_is_documented():
    documented = (REPO / "docs" / "RELIABILITY.md").read_text()
    assert [rule["alert"] for rule in alerts() if f"| {rule['alert']} |" not in documented] == []


def test_promtool_accepts_the_rules():
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_see_every_alert_fire_and_stay_silent():
    cases = [case for group in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in group["alert_rule_test"]]
    names = {rule["alert"] for rule in alerts()}
    assert {case["alertname"] for case in cases if case.get("exp_alerts")} == names
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert silent | {"CxrAnalysesFailing"} == names  # that one's firing case holds two nodes it must not fire for
    result = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """The Debian `prometheus` binary as a plain process: a temporary config, storage and free port."""

    def __init__(self, folder, rules: list[dict], target: str):
        self.folder, self.port = folder, free_port()
        folder.mkdir()
        (folder / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "cxr-node", "rules": rules}]}))
        (folder / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(folder / "rules.yml")],
            "scrape_configs": [{"job_name": "cxr-node", "static_configs": [{"targets": [target]}]}]}))

    def start(self) -> "Prometheus":
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.folder / "prometheus.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, what="Prometheus ready")
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def firing(self) -> dict[str, dict]:
        return {alert["labels"]["alertname"]: alert for alert in self.alerts() if alert["state"] == "firing"}

    def alerts(self) -> list[dict]:
        """Pending and firing alerts."""
        return self.api("alerts")["data"]["alerts"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.process)


def both_firing(prometheus: Prometheus) -> dict | None:
    """The alerts firing once both the queue's alert and its cause's (the disk) are among them."""
    firing = prometheus.firing()
    return firing if {"CxrQueueNotDraining", "CxrDiskBelowWatermark"} <= set(firing) else None


def queue_alert_gone(prometheus: Prometheus) -> bool:
    """Prometheus scraped the drained queue and holds CxrQueueNotDraining neither pending nor firing."""
    drained = prometheus.value('sum(cxr_instances{state=~"queued|processing"})') == 0
    return drained and all(alert["labels"]["alertname"] != "CxrQueueNotDraining" for alert in prometheus.alerts())


def test_prometheus_fires_queue_not_draining_while_the_worker_cannot_progress(tmp_path, dicom_dir):
    tool("prometheus")
    files = chest_copies([dicom_dir / SOURCES[0]], 3, tmp_path / "images")
    # The node takes 3 images of a study not yet stable, then comes back on a disk below its watermark:
    # they are queued, and the worker takes none of them (it waits for room), every loop alive.
    node = Node(tmp_path / "node", processing={"stable_seconds": 3600}).start()
    try:
        assert dcmsend(node.port, files).returncode == 0
    finally:
        node.stop()
    node.settings = {"processing": {"stable_seconds": 0}, "storage": {"min_free_mb": 2 ** 40}}
    # The shipped expressions; only `for:` shortened, so that the test takes seconds, not minutes.
    rules = [{**rule, "for": "2s"} if "for" in rule else rule for rule in alerts()]
    prometheus = Prometheus(tmp_path / "prometheus", rules, f"127.0.0.1:{node.health_port}")
    node.start()
    try:
        prometheus.start()
        firing = wait_for(lambda: both_firing(prometheus), 40, 1, "CxrQueueNotDraining and CxrDiskBelowWatermark")
        stuck = firing["CxrQueueNotDraining"]
        exported = node.metrics()
        queries = {expr: prometheus.api("query", query=expr.replace("$instance", ".*"))["status"]
                   for expr in dashboard_queries()}
        rule_health = {rule["name"]: rule["health"] for group in prometheus.api("rules")["data"]["groups"]
                       for rule in group["rules"]}
        node.stop()  # room again: the same node, its usual watermark
        node.settings = {"processing": {"stable_seconds": 0}}
        node.start()
        wait_for(lambda: node.queue_counts().get("instances.done", 0) == 3, 60, what="the queue drained")
        wait_for(lambda: queue_alert_gone(prometheus), 20, 1, "CxrQueueNotDraining resolved")
    finally:
        node.stop()
        prometheus.stop()
    assert stuck["labels"]["instance"] == f"127.0.0.1:{node.health_port}" and float(stuck["value"]) == 3
    assert not {"CxrLoopStalled", "CxrQueueUnreachable", "CxrNodeDown"} & set(firing)  # waiting is by design
    assert set(rule_health.values()) == {"ok"}, rule_health  # every shipped expression evaluates on real series
    assert set(queries.values()) == {"success"}, queries
    # the rules and the dashboard name only what the node exports (histograms by their _bucket series)
    families = set(re.findall(r"^# TYPE (\S+)", exported, re.M))
    named = set(re.findall(r"\b((?:cxr|process)_[a-z_]+)", RULES.read_text() + " ".join(dashboard_queries())))
    assert {name for name in named if re.sub(r"_bucket$", "", name) not in families} == set()
