"""Prometheus alert rules and the Grafana dashboard: they parse, and they watch what the proxy exports."""

import json
import re

import promql_parser
import pytest
import yaml

from tests.conftest import REPO

ALERTS = f"{REPO}/serving/monitoring/alerts.yml"
DASHBOARD = f"{REPO}/serving/monitoring/grafana-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$model": ".*"}


@pytest.fixture(scope="module")
def exported():
    """{sample name: label names} for every series the proxy (with its prediction log) can export."""
    from serving.proxy import Proxy

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proxy = Proxy(env={}, log_path=f"{tmp}/log.sqlite", watch_seconds=0)
        families = list(proxy.registry.collect())
        proxy.close()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    out = {}
    for family in families:
        labels = set()
        for metric in (proxy.m_requests, proxy.m_latency, proxy.m_backend_latency, proxy.m_score, proxy.m_fallback,
                       proxy.m_backend_errors, proxy.m_shadow, proxy.m_reloads, proxy.m_weight):
            if metric._name == family.name:
                labels = set(metric._labelnames)
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _check_expression(expr, exported, where):
    promql_parser.parse(expr)  # raises ValueError naming the syntax error
    names = set(re.findall(r"\b(skewless_[a-z_]+)\b", expr))
    assert names, f"{where}: watches no skewless metric"
    unknown = names - set(exported)
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by the proxy"
    available = set().union(*(exported[n] for n in names))
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        missing = {g.strip() for g in group.split(",")} - available
        assert not missing, f"{where}: groups by {sorted(missing)}, which {sorted(names)} do not carry"


def test_alert_rules_parse_and_watch_exported_metrics(exported):
    with open(ALERTS) as f:
        rules = [r for group in yaml.safe_load(f)["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} >= {"SkewlessNoTraffic", "SkewlessErrorSpike", "SkewlessLatencyHigh",
                                           "SkewlessScoreShift"}
    for rule in rules:
        _check_expression(rule["expr"], exported, rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"} and rule["annotations"]["summary"]


def test_checks_catch_a_typo_and_a_wrong_label(exported):
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(skewless_proxy_requests_total[5m]) > 0")
    with pytest.raises(AssertionError, match="not exported"):
        _check_expression("rate(skewless_proxy_request_total[5m]) > 0", exported, "typo")
    with pytest.raises(AssertionError, match="groups by \\['user'\\]"):
        _check_expression("sum by (user) (rate(skewless_proxy_requests_total[5m])) > 0", exported, "label")


def test_dashboard_panels_query_exported_metrics_and_do_not_overlap(exported):
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel '{panel['title']}' overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= mine
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"panel '{panel['title']}': unknown variable in {target['expr']}"
            _check_expression(expr, exported, f"panel '{panel['title']}'")
    watched = {n for p in panels for t in p["targets"] for n in re.findall(r"\b(skewless_[a-z_]+)\b", t["expr"])}
    # Requests, errors, latency and the score distribution per variant are on the board.
    assert {"skewless_proxy_requests_total", "skewless_proxy_request_latency_seconds_bucket",
            "skewless_proxy_prediction_score_bucket"} <= watched
