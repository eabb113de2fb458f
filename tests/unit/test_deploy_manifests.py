"""The deployment artefacts under deploy/ parse and agree with the code's metrics.

Static checks only: no network, no servers. Every YAML file parses; every metric
name the alert rules and the Grafana dashboard query is one the services export
(or a series the rules themselves record), and the code defines every name of
that list; every alert has a severity, a summary, a description and a runbook
section that exists; the dashboard has its stable uid and a datasource variable;
the Compose and Kubernetes manifests keep the few properties the services rely on.
``promtool``, ``check-jsonschema``, ``kubernetes-validate`` and ``yamllint`` go
further (see deploy/README.md).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "omnistock-overview.json"
README_FILE = DEPLOY / "README.md"
K8S = DEPLOY / "k8s"

COUNTERS_AND_GAUGES = frozenset(
    {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_sent_total",
        "omni_outbox_published_total",
        "omni_outbox_duplicates_total",
        "omni_outbox_publish_errors_total",
        "omni_outbox_backlog_events",
        "omni_outbox_oldest_unpublished_age_seconds",
        "omni_consumer_messages_total",
        "omni_consumer_redeliveries_total",
        "omni_consumer_dead_letters_total",
        "omni_consumer_errors_total",
        "omni_consumer_pending_messages",
        "omni_ledger_movements_total",
        "omni_ledger_movement_units_total",
        "omni_ledger_movements_replayed_total",
        "omni_ledger_batches_rejected_total",
        "omni_reservation_reserve_total",
        "omni_reservation_reserved_units_total",
        "omni_reservation_active_holds",
        "omni_reservation_held_units",
        "omni_reservation_lines_ended_total",
        "omni_reservation_expired_total",
        "omni_reservation_short_lines_total",
        "omni_reservation_projection_resyncs_total",
        "omni_reservation_watch_subscribers",
        "omni_reservation_watch_updates_total",
        "omni_reservation_watch_dropped_subscribers_total",
        "omni_routing_orders_total",
        "omni_routing_replans_total",
        "omni_routing_reroutes_total",
        "omni_routing_orders_needing_attention_total",
        "omni_routing_orders_awaiting_attention",
        "omni_fulfilment_tasks_created_total",
        "omni_fulfilment_steps_total",
        "omni_fulfilment_short_picked_units_total",
        "omni_fulfilment_wrong_pickup_codes_total",
        "omni_fulfilment_expired_total",
        "omni_fulfilment_open_tasks",
        "omni_fulfilment_oldest_unaccepted_task_age_seconds",
        "omni_sweeper_runs_total",
        "omni_sweeper_items_total",
        "omni_sweeper_last_success_timestamp_seconds",
    }
)
HISTOGRAMS = frozenset(
    {
        "grpc_server_handling_seconds",
        "omni_outbox_publish_lag_seconds",
        "omni_outbox_relay_cycle_seconds",
        "omni_consumer_handling_seconds",
        "omni_consumer_event_age_seconds",
        "omni_ledger_batch_movements",
        "omni_reservation_movement_to_availability_seconds",
        "omni_routing_plan_duration_seconds",
        "omni_routing_plan_shipments",
        "omni_group_commit_batch_size",
        "omni_group_commit_queue_seconds",
        "omni_group_commit_batch_seconds",
        "omni_sweeper_run_seconds",
    }
)
EXPORTED = (
    COUNTERS_AND_GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)
SEVERITIES = frozenset({"critical", "warning", "info"})

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


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Kubernetes objects of deploy/k8s by "Kind/name"."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and "metadata" in document:
                objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


# (compose service and component name, gRPC port, metrics port) of the deployed services.
SERVICES = [
    ("ledger", 50051, 9101),
    ("reservation", 50052, 9102),
    ("routing", 50053, 9103),
    ("fulfilment", 50054, 9104),
]

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def test_deploy_has_yaml_files() -> None:
    names = {path.relative_to(DEPLOY).as_posix() for path in YAML_FILES}
    assert {"compose/compose.yaml", "prometheus/rules.yml", "k8s/kustomization.yaml"} <= names


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.relative_to(DEPLOY).as_posix()) for p in YAML_FILES]
)
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert documents, f"{path} holds no YAML document"


def code_sample_names() -> set[str]:
    """Every sample name the code's metrics can expose (shared and per service)."""
    modules = ["omnistock.metrics"] + [
        f"services.{path.parent.name}.metrics"
        for path in sorted((ROOT / "services").glob("*/metrics.py"))
    ]
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for module in modules:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_whitelisted_metrics_are_defined_by_the_code() -> None:
    defined = code_sample_names()
    assert "omni_reservation_reserve_total" in defined
    missing = EXPORTED - {"up"} - defined
    assert not missing, f"whitelisted but not defined in the code: {sorted(missing)}"


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (job, kind) (rate(omni_ledger_movements_total{kind=~"a|b",x!="y z"}[5m] '
        "offset 1h)) / on (job) group_left sum(up) > 1e3 and absent(foo_total) "
        'or histogram_quantile(0.99, sum by (le) (rate(h_bucket{a="$service"}[$__rate_interval])))'
        " or level:recorded_series:rate5m"
    )
    assert metric_names(expr) == {
        "omni_ledger_movements_total",
        "up",
        "foo_total",
        "h_bucket",
        "level:recorded_series:rate5m",
    }


def test_rules_use_only_exported_or_recorded_metrics() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert recorded, "rules.yml records nothing"
    for rule in rules():
        name = rule.get("record") or rule.get("alert")
        used = metric_names(rule["expr"])
        assert used, f"{name}: no metric found in {rule['expr']!r}"
        unknown = used - EXPORTED - recorded
        assert not unknown, f"{name} uses unknown metrics {sorted(unknown)}"


def test_recording_rules_follow_level_metric_operation_naming() -> None:
    for rule in rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    readme = README_FILE.read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9_ -]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)
    }
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for alert in alerts():
        name = alert["alert"]
        assert alert.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert annotations.get("description", "").strip(), f"{name}: no description"
        runbook = annotations.get("runbook", "")
        assert runbook.startswith("deploy/README.md#"), f"{name}: runbook {runbook!r}"
        assert runbook.split("#", 1)[1] in anchors, f"{name}: no README section {runbook!r}"


def test_server_error_alerts_ignore_caller_mistakes() -> None:
    by_name = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    server_errors = by_name["service_method:grpc_server_server_errors:rate5m"]
    excluded = re.search(r'grpc_code!~"([^"]+)"', server_errors)
    assert excluded is not None
    codes = set(excluded.group(1).split("|"))
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"} <= codes
    assert not codes & {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"}


def test_dashboard_has_stable_uid_and_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "omnistock-overview"
    variables = board["templating"]["list"]
    datasource = [v for v in variables if v["type"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["query"] == "prometheus"
    variable = "${" + datasource[0]["name"] + "}"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == variable, panel["title"]
            assert all(t["datasource"]["uid"] == variable for t in panel["targets"])


def test_dashboard_queries_use_only_exported_metrics() -> None:
    board = dashboard()
    queries = panel_exprs(board["panels"])
    assert len(queries) >= 10
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
            assert selector is not None, text
            queries.append((f"variable {variable['name']}", selector.group(1)))
    for title, expr in queries:
        used = metric_names(expr)
        assert used, f"{title}: no metric found in {expr!r}"
        assert used <= EXPORTED, f"{title} uses unknown metrics {sorted(used - EXPORTED)}"


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrape_jobs_name_the_service() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "rules.yml" in config["rule_files"]
    jobs = [job for job in config["scrape_configs"] if job["job_name"].startswith("omnistock-")]
    assert jobs
    for job in jobs:
        service = job["job_name"].removeprefix("omnistock-")
        assert job["honor_labels"] is True, job["job_name"]
        assert all(target["labels"]["service"] == service for target in job["static_configs"])


def test_compose_prepares_before_the_services() -> None:
    compose = load_yaml(DEPLOY / "compose" / "compose.yaml")
    services = compose["services"]
    expected = {
        "postgres", "nats", "prepare", "ledger", "reservation", "routing", "fulfilment",
        "prometheus", "grafana",
    }  # fmt: skip
    assert expected <= set(services)
    assert "omni migrate" in services["prepare"]["command"][-1]
    assert "omni provision-streams" in services["prepare"]["command"][-1]
    for name, grpc_port, metrics_port in SERVICES:
        service = services[name]
        assert service["command"] == ["python", "-m", f"services.{name}"]
        condition = service["depends_on"]["prepare"]["condition"]
        assert condition == "service_completed_successfully", name
        assert service["environment"]["OMNI_GRPC_HOST"] == "0.0.0.0"
        assert f"127.0.0.1:{grpc_port}:{grpc_port}" in service["ports"], name
        assert f"127.0.0.1:{metrics_port}:{metrics_port}" in service["ports"], name
        assert f"127.0.0.1:{grpc_port}" in service["healthcheck"]["test"][-1], name
    # The reservation service calls the ledger by its compose service name;
    # routing calls the ledger and the reservation service.
    assert services["reservation"]["environment"]["OMNI_LEDGER_TARGET"] == "ledger:50051"
    assert services["routing"]["environment"]["OMNI_LEDGER_TARGET"] == "ledger:50051"
    assert services["routing"]["environment"]["OMNI_RESERVATION_TARGET"] == "reservation:50052"
    assert {"ledger", "reservation"} <= set(services["routing"]["depends_on"])
    nats_conf = (DEPLOY / "compose" / "nats.conf").read_text(encoding="utf-8")
    assert re.search(r"^\s*sync_interval:\s*always\s*$", nats_conf, flags=re.MULTILINE)


def test_prometheus_scrapes_every_service() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    for name, _, metrics_port in SERVICES:
        assert targets[f"omnistock-{name}"] == [f"{name}:{metrics_port}"]


def test_kustomization_lists_existing_files_but_not_the_secret_example() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / resource).is_file() for resource in resources), resources
    assert "secret.example.yaml" not in resources
    listed = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == set(resources)


@pytest.mark.parametrize(
    ("name", "replicas", "grpc_port", "metrics_port", "health_service"),
    [
        ("ledger", 3, 50051, 9101, "omni.ledger.v1.StockLedgerService"),
        ("reservation", 2, 50052, 9102, "omni.reservation.v1.ReservationService"),
        ("routing", 2, 50053, 9103, "omni.routing.v1.OrderRoutingService"),
        ("fulfilment", 2, 50054, 9104, "omni.fulfilment.v1.FulfilmentService"),
    ],
)
def test_deployment_is_hardened_and_drains_gracefully(
    name: str, replicas: int, grpc_port: int, metrics_port: int, health_service: str
) -> None:
    objects = k8s_documents()
    deployment = objects[f"Deployment/omnistock-{name}"]
    assert deployment["spec"]["replicas"] == replicas
    pod = deployment["spec"]["template"]["spec"]
    # The service's own shutdown: 10 s gRPC grace, then up to 10 s for relay and consumers.
    assert pod["terminationGracePeriodSeconds"] > 20
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "preStop" not in container.get("lifecycle", {})
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == health_service
    assert container["livenessProbe"]["grpc"]["port"] == grpc_port
    assert {"requests", "limits"} <= set(container["resources"])
    sources = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert sources == {"omnistock-config", "omnistock-secrets"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == name  # becomes service="<name>" when scraped
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service_ports = {
        p["name"]: p["port"] for p in objects[f"Service/omnistock-{name}"]["spec"]["ports"]
    }
    assert service_ports == {"grpc": grpc_port, "metrics": metrics_port}
    assert f"Service/omnistock-{name}-headless" in objects
    assert f"PodDisruptionBudget/omnistock-{name}" in objects
    assert "Job/omnistock-prepare" in objects


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("OMNI_LEDGER_TARGET", "omnistock-ledger"),
        ("OMNI_RESERVATION_TARGET", "omnistock-reservation"),
    ],
)
def test_service_targets_are_the_services(variable: str, expected: str) -> None:
    objects = k8s_documents()
    target = objects["ConfigMap/omnistock-config"]["data"][variable]
    host, port = target.rsplit(":", 1)
    service = host.split(".")[0]
    assert host in {service, f"{service}.omnistock", f"{service}.omnistock.svc.cluster.local"}
    ports = [p["port"] for p in objects[f"Service/{service}"]["spec"]["ports"]]
    assert service == expected and int(port) in ports


def test_pickup_code_secret_comes_from_a_secret_and_only_to_fulfilment() -> None:
    variable = "OMNI_FULFILMENT_CODE_SECRET"
    objects = k8s_documents()
    for key, document in objects.items():
        if document["kind"] == "ConfigMap":
            assert variable not in document.get("data", {}), key
    assert variable in objects["Secret/omnistock-secrets"]["stringData"]
    (container,) = objects["Deployment/omnistock-fulfilment"]["spec"]["template"]["spec"][
        "containers"
    ]
    env = {item["name"]: item for item in container["env"]}
    reference = env[variable]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "omnistock-secrets", "key": variable}
    services = load_yaml(DEPLOY / "compose" / "compose.yaml")["services"]
    assert services["fulfilment"]["environment"][variable]
    for name, _, _ in SERVICES:
        if name != "fulfilment":
            assert variable not in services[name]["environment"], name
