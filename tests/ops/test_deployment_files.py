"""The files an operator copies (alert rules, scrape config, dashboard, systemd units) and the metrics catalogue."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from backend.cli import _parser as backend_parser
from backend.metrics import BackendMetrics
from gateway.config.settings import Settings
from gateway.observe.metrics import GatewayMetrics
from gateway.ops.admin import check_token
from gateway.ops.cli import _parser as gateway_parser

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
METRICS_PAGE = ROOT / "docs" / "metrics.md"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus (promtool) is not installed: `make setup` installs it"
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=CONFIG / "prometheus", timeout=60)


def test_promtool_accepts_the_alert_rules() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_the_brownout_alert_fires_while_a_rule_applies_and_names_it(tmp_path: Path) -> None:
    """Prometheus's own rule engine (`promtool test rules`) over two replicas' gauges: firing while either
    reports the rule applied, silent before and after, one alert per rule whatever the number of replicas."""
    rules = yaml.safe_load((CONFIG / "prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    (alert,) = [rule for rule in rules if rule["alert"] == "QuotagateBrownout"]
    named = {key: text.replace("{{ $labels.rule }}", "free-one-a-day") for key, text in alert["annotations"].items()}
    assert "free-one-a-day" in named["summary"]

    def gauge(instance: str, rule: str, values: str) -> dict[str, str]:
        labels = f'rule="{rule}", instance="{instance}", job="quotagate-gateway"'
        return {"series": f"quotagate_brownout_active{{{labels}}}", "values": values}

    def expect(minute: int, *firing: str) -> dict[str, Any]:
        alerts = [{"exp_labels": {"severity": "ticket", "rule": rule}, "exp_annotations": named} for rule in firing]
        return {"eval_time": f"{minute}m", "alertname": "QuotagateBrownout", "exp_alerts": alerts}

    test = {
        "rule_files": [str(CONFIG / "prometheus/alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    gauge("gw-1:8000", "free-one-a-day", "0 0 1 1 1 0 0"),
                    gauge("gw-2:8000", "free-one-a-day", "0 0 1 1 0 0 0"),
                    gauge("gw-1:8000", "pro-slower", "0 0 0 0 0 0 0"),
                ],
                "alert_rule_test": [expect(1), expect(2, "free-one-a-day"), expect(4, "free-one-a-day"), expect(5)],
            }
        ],
    }
    path = tmp_path / "brownout_test.yml"
    path.write_text(yaml.safe_dump(test))
    checked = _promtool("test", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_accepts_the_example_scrape_config_and_its_rules() -> None:
    checked = _promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_imports_into_grafana() -> None:
    dashboard = json.loads((CONFIG / "grafana/quotagate.json").read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    queried = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert queried
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(target["expr"] for target in panel["targets"]), panel["title"]


def _exported(registry: CollectorRegistry) -> set[str]:
    return {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()
    }


def test_the_metrics_catalogue_lists_every_metric_and_only_those() -> None:
    documented = set(re.findall(r"^\| `(quotagate_\w+)` \|", METRICS_PAGE.read_text(), re.MULTILINE))
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.declare(["free"], ["/v1/images/generations"], ["diffusion"])
    metrics.loaded_config("v1")
    metrics.upstream_healthy.labels("diffusion").set(1)
    backend = BackendMetrics(registry)
    backend.queue_depth.labels(priority="0").set(0)
    exported = _exported(registry)
    assert documented - exported == set(), "documented but not exported"
    families = {family.name for family in registry.collect()}
    undocumented = {name for name in families if not ({name, f"{name}_total"} & documented)}
    assert undocumented == set(), "exported but not in docs/metrics.md"


def _exec_start(unit: str) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(CONFIG / "systemd" / unit)
    return shlex.split(parser["Service"]["ExecStart"])


@pytest.mark.parametrize(
    ("unit", "program", "parser"),
    [
        ("quotagate.service", "quotagate", gateway_parser),
        ("quotagate-backend.service", "quotagate-backend", backend_parser),
    ],
)
def test_the_systemd_units_run_commands_that_exist(unit: str, program: str, parser: object) -> None:
    command = _exec_start(unit)
    assert Path(command[0]).name == program
    parser().parse_args(command[1:])  # type: ignore[operator]  # exits (fails the test) on an unknown option


def test_the_example_environment_is_what_the_gateway_reads(tmp_path: Path) -> None:
    lines = (CONFIG / "systemd/quotagate.env").read_text().splitlines()
    environ = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    settings = Settings.from_env(environ)
    assert settings.upstreams["diffusion"] == ("http://gpu-1.internal:8001", "http://gpu-2.internal:8001")
    assert settings.log_format == "json"
    check_token(environ["QUOTAGATE_ADMIN_TOKEN"])
    unknown = {name for name in environ if not name.startswith("QUOTAGATE_")}
    assert unknown == set()
