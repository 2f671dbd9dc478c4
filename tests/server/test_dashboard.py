"""The Grafana dashboard (dashboards/grafana.json) names only metrics the server exports: every
PromQL expression's metric names, read from the JSON, are checked against a real tiny
deployment's /metrics after it has served requests (so labelled series and histograms have
samples)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.deployment import Deployment

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that read like names: aggregation modifiers, vector matching, set operators.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless"}  # fmt: skip
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: label matchers, string literals, range and
    subquery windows, grouping label lists and function calls taken out."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings first: they may hold braces
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(rf"(?<![\w:.$]){_NAME}", expr):
        name = match.group()
        called = expr[match.end() :].lstrip().startswith("(")
        if not called and name not in KEYWORDS and not re.fullmatch(r"[0-9.eE+-]+|Inf|NaN", name):
            names.add(name)
    return names


def test_metric_names_are_parsed_out_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, role) (rate(a:x_bucket{role="pre{fill}"}'
        "[$__rate_interval]))) / on (instance) group_left sum(b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a:x_bucket", "b_total"}


def dashboard_expressions() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    return found


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, dict[str, float]]]:
    """Sample name -> (family type, {family: its _count}) from a deployment that has served
    requests, finished and refused."""
    d = Deployment("--num-kv-blocks", "128", "--offload-blocks", "64", "--torch-threads", "1",
                   "--offload-policy", "always")  # fmt: skip
    try:
        for prompt in ("Hello world", "how are you?"):
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            assert httpx.post(f"{d.url}/generate", json=body, timeout=60).status_code == 200
        too_long = {"prompt_token_ids": [1] * 4096, "max_tokens": 1}  # counted as an error
        assert httpx.post(f"{d.url}/generate", json=too_long, timeout=60).status_code == 400
        text = httpx.get(f"{d.url}/metrics", timeout=10).text
    finally:
        d.stop()
    samples: dict[str, tuple[str, dict[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = (family.type, {})
            if family.type == "histogram" and sample.name == family.name + "_count":
                samples[sample.name][1][family.name] = sample.value
    return samples


def test_every_dashboard_metric_is_exported(exported) -> None:
    checked = set()
    for title, expr in dashboard_expressions():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{title}: {name} is not in /metrics ({expr})"
            kind, _ = exported[name]
            if name.endswith(HISTOGRAM_SUFFIXES):
                assert kind == "histogram", f"{title}: {name} is a {kind}, not a histogram"
                base = name.rsplit("_", 1)[0]
                count = exported[base + "_count"][1][base]
                assert count > 0, f"{title}: {base} has no observations after the requests"
            checked.add(name)
    # The panels the README lists are there: latency, throughput, KV, offload, liveness.
    for needed in ("adrenaline:time_to_first_token_seconds_bucket",
                   "adrenaline:time_per_output_token_seconds_bucket",
                   "adrenaline:inter_token_latency_seconds_bucket",
                   "adrenaline:generation_tokens_total", "adrenaline:kv_cache_usage_perc",
                   "adrenaline:offload_ratio", "adrenaline:executor_attention_time_seconds",
                   "adrenaline:executor_sm_share", "adrenaline:worker_up",
                   "adrenaline:worker_stuck"):  # fmt: skip
        assert needed in checked, f"the dashboard has no panel over {needed}"
