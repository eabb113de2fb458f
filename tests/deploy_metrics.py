"""The metric names the alert rules and the Grafana dashboard use, read from deploy/.

Shared by the static manifest checks (``tests/unit/test_deploy_manifests.py``)
and the end-to-end test that runs a real Prometheus against the services
(``tests/e2e/test_observability.py``), so both check the same list.
No I/O beyond reading the two files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "omnistock-overview.json"

# Words of PromQL that look like metric names but are not.
PROMQL_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan", "start", "end", "atan2",
    }
)  # fmt: skip

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TEMPLATE_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
# A whole identifier (not part of a number or a longer name) that is not a function call.
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()")
# A Grafana query variable: label_values(<selector>, <label>).
_LABEL_VALUES = re.compile(r"label_values\((.+),\s*\w+\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) selects."""
    text = _TEMPLATE_VARIABLE.sub("", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub("", text)
    return {m.group(0) for m in _IDENTIFIER.finditer(text)} - PROMQL_KEYWORDS


def load_yaml(path: Path) -> Any:
    """The single YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    """Every recording and alerting rule of rules.yml."""
    document = load_yaml(RULES_FILE)
    assert isinstance(document, dict)
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    """The alerting rules of rules.yml."""
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    """The series the recording rules of rules.yml produce."""
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    """The overview dashboard."""
    document = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def panel_exprs(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, rows' nested panels included."""
    found: list[tuple[str, str]] = []
    for panel in panels:
        found += [(panel["title"], t["expr"]) for t in panel.get("targets", []) if "expr" in t]
        found += panel_exprs(panel.get("panels", []))
    return found


def dashboard_queries(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(title, PromQL) of every panel query and of every query variable's selector.

    A query variable must be ``label_values(<selector>, <label>)``; anything else
    raises ValueError (its metrics could not be checked).
    """
    board = board if board is not None else dashboard()
    queries = panel_exprs(board["panels"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            selector = _LABEL_VALUES.fullmatch(text)
            if selector is None:
                raise ValueError(f"variable {variable['name']}: not label_values(...): {text!r}")
            queries.append((f"variable {variable['name']}", selector.group(1)))
    return queries


def rule_metric_names() -> set[str]:
    """Every metric name the rules read, recorded series included."""
    return {name for rule in rules() for name in metric_names(rule["expr"])}


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries and variables read."""
    return {name for _, expr in dashboard_queries() for name in metric_names(expr)}


def exported_names_in_use() -> set[str]:
    """The names the rules and the dashboard read that a scrape must supply: everything
    they use except the series the rules record themselves."""
    return (rule_metric_names() | dashboard_metric_names()) - recorded_names()
