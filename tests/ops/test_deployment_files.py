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
ALERTS = CONFIG / "prometheus/alerts.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus (promtool) is not installed: `make setup` installs it"
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=CONFIG / "prometheus", timeout=60)


def test_promtool_accepts_the_alert_rules() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout


def _alert(name: str) -> dict[str, Any]:
    (rule,) = [
        rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if rule["alert"] == name
    ]
    return dict(rule)


def _annotations(name: str, value: str = "", **labels: str) -> dict[str, str]:
    """The alert's annotations as Prometheus renders them: its labels, and `value` for `{{ $value | ... }}`."""
    rendered = {}
    for key, text in _alert(name)["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        rendered[key] = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
    return rendered


def _gauge(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
    """One gateway's series, in promtool's notation (`values`: one a minute)."""
    text = ", ".join(f'{key}="{value}"' for key, value in {**labels, "instance": instance}.items())
    return {"series": f'{name}{{{text}, job="quotagate-gateway"}}', "values": values}


def _firing(name: str, value: str = "", **labels: str) -> dict[str, Any]:
    """One firing alert `name` as promtool should find it: its labels, and its annotations rendered with them."""
    severity = _alert(name)["labels"]["severity"]
    return {"exp_labels": {"severity": severity, **labels}, "exp_annotations": _annotations(name, value, **labels)}


def _expect(name: str, minute: int, *firing: dict[str, Any]) -> dict[str, Any]:
    """At `minute`, exactly the `firing` alerts (each its labels and annotations) of `name`."""
    return {"eval_time": f"{minute}m", "alertname": name, "exp_alerts": list(firing)}


def _rule_tests(tmp_path: Path, *tests: dict[str, Any]) -> None:
    """`promtool test rules` over the shipped alert rules: Prometheus's own rule engine, one sample a minute."""
    path = tmp_path / "alerts_test.yml"
    cases = [{"interval": "1m", **test} for test in tests]
    path.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": cases}))
    checked = _promtool("test", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_brownout_alert_fires_while_a_rule_applies_and_names_it(tmp_path: Path) -> None:
    """Over two replicas' gauges: firing while either reports the rule applied, silent before and after, one
    alert per rule whatever the number of replicas."""
    named = _annotations("QuotagateBrownout", rule="free-one-a-day")
    assert "free-one-a-day" in named["summary"]

    def brownout(instance: str, rule: str, values: str) -> dict[str, str]:
        return _gauge("quotagate_brownout_active", instance, values, rule=rule)

    def expect(minute: int, *firing: str) -> dict[str, Any]:
        return _expect("QuotagateBrownout", minute, *(_firing("QuotagateBrownout", rule=rule) for rule in firing))

    series = [
        brownout("gw-1:8000", "free-one-a-day", "0 0 1 1 1 0 0"),
        brownout("gw-2:8000", "free-one-a-day", "0 0 1 1 0 0 0"),
        brownout("gw-1:8000", "pro-slower", "0 0 0 0 0 0 0"),
    ]
    _rule_tests(
        tmp_path,
        {
            "input_series": series,
            "alert_rule_test": [expect(1), expect(2, "free-one-a-day"), expect(4, "free-one-a-day"), expect(5)],
        },
    )


def test_the_no_capacity_alert_pages_for_a_pool_with_no_room_for_a_minute(tmp_path: Path) -> None:
    """Per pool, fleet-wide: two gateways report each pool; a gateway that cannot read Redis reports NaN, which
    neither hides a pool with no room nor makes one. A pool back within the minute never pages."""

    def capacity(instance: str, pool: str, values: str) -> dict[str, str]:
        return _gauge("quotagate_fleet_capacity_images", instance, values, pool=pool)

    series = [
        capacity("gw-1:8000", "diffusion", "4 4 0 0 0 0 4"),
        capacity("gw-2:8000", "diffusion", "4 4 0 0 0 0 4"),
        capacity("gw-3:8000", "diffusion", "NaN NaN NaN NaN NaN NaN NaN"),  # its Redis is away
        capacity("gw-1:8000", "spare", "1 1 0 1 1 0 1"),  # a minute at 0, twice
        capacity("gw-3:8000", "edits", "NaN NaN NaN NaN NaN NaN NaN"),  # known to no gateway: unknown, not 0
    ]
    paged = _firing("QuotagateNoCapacity", pool="diffusion")
    tests = [_expect("QuotagateNoCapacity", minute) for minute in (1, 2, 6)]
    tests += [_expect("QuotagateNoCapacity", minute, paged) for minute in (3, 5)]
    _rule_tests(tmp_path, {"input_series": series, "alert_rule_test": tests})


def test_the_line_wait_alert_fires_per_plan_after_ten_minutes_over_five(tmp_path: Path) -> None:
    """One alert per pool and plan, however many gateways report it; a wait that dips under 5 minutes starts the
    10 again, and one at 5 minutes exactly is not over."""

    def wait(instance: str, plan: str, values: str) -> dict[str, str]:
        return _gauge("quotagate_line_wait_seconds", instance, values, pool="diffusion", plan=plan)

    series = [
        wait("gw-1:8000", "free", "0 400x14"),
        wait("gw-2:8000", "free", "0 400x14"),
        wait("gw-1:8000", "pro", "300x15"),
        wait("gw-1:8000", "team", "400x5 200 400x8"),
    ]
    fired = _firing("QuotagateLineWaitLong", "6m 40s", pool="diffusion", plan="free")
    tests = [_expect("QuotagateLineWaitLong", 10), _expect("QuotagateLineWaitLong", 11, fired)]
    tests.append(_expect("QuotagateLineWaitLong", 14, fired))
    _rule_tests(tmp_path, {"input_series": series, "alert_rule_test": tests})


def test_the_eta_alert_fires_on_a_median_error_over_half_given_enough_jobs(tmp_path: Path) -> None:
    """The median of the jobs started in 15 minutes, held 15 minutes: over 50 % with 2 jobs a minute fires; the
    same errors with 1 job a minute (15 in the window, under 20) do not, nor do errors of 10 %."""
    bounds = ["0.05", "0.1", "0.2", "0.35", "0.5", "1.0", "2.0", "5.0", "+Inf"]

    def jobs(per_minute: int, error_under: str) -> list[dict[str, str]]:
        """`per_minute` jobs a minute, each with an error in the bucket up to `error_under`."""
        name = "quotagate_line_eta_error_ratio"
        counted = f"0+{per_minute}x40"
        series = [
            _gauge(f"{name}_bucket", "gw-1:8000", counted if float(le) >= float(error_under) else "0x40", le=le)
            for le in bounds
        ]
        return [*series, _gauge(f"{name}_count", "gw-1:8000", counted)]

    off = _firing("QuotagateEtaInaccurate", "75%")  # the median within the bucket (0.5, 1.0]
    enough = [_expect("QuotagateEtaInaccurate", minute) for minute in (5, 20)]
    enough.append(_expect("QuotagateEtaInaccurate", 35, off))
    _rule_tests(
        tmp_path,
        {"input_series": jobs(2, "1.0"), "alert_rule_test": enough},
        {"input_series": jobs(1, "1.0"), "alert_rule_test": [_expect("QuotagateEtaInaccurate", 35)]},
        {"input_series": jobs(2, "0.2"), "alert_rule_test": [_expect("QuotagateEtaInaccurate", 35)]},
    )


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


def _every_metric() -> CollectorRegistry:
    """A registry holding every series the gateway and the backend export."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.declare(["free"], ["/v1/images/generations"], ["diffusion"])
    metrics.loaded_config("v1")
    metrics.upstream_healthy.labels("diffusion").set(1)
    for gauge in (metrics.fleet_capacity, metrics.fleet_drain, metrics.fleet_backends):
        gauge.labels("diffusion").set(0)
    for by_plan in (metrics.fleet_held, metrics.line_length, metrics.line_wait):
        by_plan.labels("diffusion", "free").set(0)
    metrics.brownout_active.labels("free-one-a-day").set(0)
    backend = BackendMetrics(registry)
    backend.queue_depth.labels(priority="0").set(0)
    return registry


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((CONFIG / "grafana/quotagate.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_and_the_alerts_name_only_exported_series() -> None:
    exported = _exported(_every_metric())
    alerts = [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    for expr in _dashboard_queries() + alerts:
        assert set(re.findall(r"\bquotagate_\w+", expr)) <= exported, expr


@pytest.mark.parametrize(
    "series",
    [
        "quotagate_fleet_capacity_images",
        "quotagate_fleet_held_images",
        "quotagate_fleet_live_backends",
        "quotagate_fleet_drain_images_per_second",
        "quotagate_line_length",
        "quotagate_line_wait_seconds",
        "quotagate_line_eta_error_ratio_bucket",
        "quotagate_jobs_total",
        "quotagate_brownout_active",
    ],
)
def test_the_dashboard_charts_the_fleet_and_its_line(series: str) -> None:
    assert any(re.search(rf"\b{series}\b", expr) for expr in _dashboard_queries())


def test_the_metrics_catalogue_lists_every_metric_and_only_those() -> None:
    documented = set(re.findall(r"^\| `(quotagate_\w+)` \|", METRICS_PAGE.read_text(), re.MULTILINE))
    registry = _every_metric()
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
