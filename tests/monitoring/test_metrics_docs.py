"""The example Grafana dashboard and Prometheus alert rules in docs/monitoring: every metric
they use is one ``GET /metrics`` exports, and the rule file has the shape Prometheus
loads. With ``promtool`` at hand (``CAPE_PROMTOOL`` or on PATH; ``.ci/run`` extracts it
from Debian's ``prometheus`` package) the rules are also checked and unit-tested by it
(``alerts.test.yml``: each alert fires on the series it is meant for, and only then).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_metrics import METRICS_TOKEN, TOKEN_SHA, Env, _ingest_story

DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
# Exported by the audit sinks' collector (cape_coordinator/services/delivery.py), which
# registers it through cape_coordinator.metrics.register_collector.
FROM_SINKS = {"cape_audit_delivery_pending"}
_NAME = re.compile(r"\bcape_[a-z0-9_]+\b")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _expressions(node: Any) -> list[str]:
    """Every ``expr`` string in a JSON/YAML tree."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query") and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_expressions(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_expressions(v))
    return found


def _exported(tmp_path: Path) -> set[str]:
    """Family and sample names of a scrape after real ingests and a full verification."""
    from prometheus_client.parser import text_string_to_metric_families

    env = Env(tmp_path, metrics_token_sha256=TOKEN_SHA)
    try:
        _ingest_story(env)
        env.http.get("/v1/audit/verify", headers={"Authorization": f"Bearer {env.admin}"})
        text = env.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    finally:
        env.close()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            # A labelled counter with no child yet has no sample; its series will be _total.
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def _allowed(tmp_path: Path) -> set[str]:
    exported = _exported(tmp_path)
    if importlib.util.find_spec("cape_coordinator.services.delivery") is not None:
        # Once the sinks module is there, its metric must really be exported.
        assert FROM_SINKS <= exported, FROM_SINKS - exported
        return exported
    return exported | FROM_SINKS


def test_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = _expressions(panels) + _expressions(dashboard["templating"])
    used = {m for e in exprs for m in _NAME.findall(e)}
    assert {"cape_runs", "cape_audit_ingest_seconds_bucket", "cape_audit_chain_head_ok"} <= used
    allowed = _allowed(tmp_path)
    assert used <= allowed, used - allowed
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])


def test_alert_rules_have_prometheus_shape_and_use_exported_metrics(tmp_path: Path) -> None:
    rules_doc = yaml.safe_load((DOCS / "alerts.yml").read_text())
    assert set(rules_doc) == {"groups"}
    alerts: set[str] = set()
    used: set[str] = set()
    for group in rules_doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule)
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["for"]
            for field in ("labels", "annotations"):
                assert all(
                    isinstance(k, str) and isinstance(v, str)
                    for k, v in rule.get(field, {}).items()
                )
            alerts.add(rule.get("alert", ""))
            used.update(_NAME.findall(rule["expr"]))
    assert {"CapeRunLost", "CapeAuditChainBroken", "CapeAuditDeliveryBacklog"} <= alerts
    allowed = _allowed(tmp_path)
    assert used <= allowed, used - allowed


def _promtool() -> str | None:
    return os.environ.get("CAPE_PROMTOOL") or shutil.which("promtool")


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not found (set CAPE_PROMTOOL; .ci/run provides it)")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=DOCS, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
