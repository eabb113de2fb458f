"""The deployment artefacts under deploy/ parse and agree with the code's metrics.

Static checks only: no network, no servers. Every YAML file parses; every rule
and dashboard query parses as PromQL (``promql-parser``) and selects only metrics
the services export (or series the rules themselves record), and the code
defines every name of that list; every alert has a severity, a summary, a
description, a runbook section named after it and a promtool test case that
fires and one that stays silent; the dashboard has its stable uid and a
datasource variable and covers what operators look at; the Compose and
Kubernetes manifests keep the properties the services rely on (two replicas and
a NATS cluster in compose; autoscaling, probes, migrations before code, secrets
and scrape labels in Kubernetes), including the custom resources
(CloudNativePG, Prometheus Operator) that ``kubernetes-validate`` has no schema
for. ``promtool``, ``check-jsonschema``, ``kubernetes-validate`` and
``yamllint`` go further (``make deploy-check``, see deploy/README.md).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.deploy_metrics import (
    DEPLOY,
    ROOT,
    alerts,
    dashboard,
    dashboard_queries,
    load_yaml,
    metric_names,
    rules,
)

README_FILE = DEPLOY / "README.md"
RULES_TEST_FILE = DEPLOY / "prometheus" / "rules.test.yml"
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


def k8s_documents(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """Kubernetes objects of deploy/k8s (or one of its sub-folders) by "Kind/name"."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and "metadata" in document:
                objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


# Grafana's interval variables become a duration, every other variable a word
# (they only ever stand inside a label matcher's string).
_GRAFANA_INTERVAL = re.compile(r"\$\{?__(?:rate_interval|interval|range)\b\}?")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")


def parse_promql(expr: str) -> promql_parser.Expr:
    """The PromQL syntax tree of a rule expression or a Grafana query (variables replaced).

    Raises ValueError when the expression is not valid PromQL.
    """
    return promql_parser.parse(_GRAFANA_VARIABLE.sub("x", _GRAFANA_INTERVAL.sub("5m", expr)))


def parsed_metric_names(expr: str) -> set[str]:
    """The metric names the syntax tree of ``expr`` selects."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(parse_promql(expr), visit)
    return names


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in panels:
        found += [panel, *all_panels(panel.get("panels", []))]
    return found


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
        assert runbook == f"deploy/README.md#{name.lower()}", f"{name}: runbook {runbook!r}"
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
    queries = dashboard_queries()
    assert len(queries) >= 10
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


def compose_services() -> dict[str, Any]:
    """The services of deploy/compose/compose.yaml (YAML merge keys resolved)."""
    services: dict[str, Any] = load_yaml(DEPLOY / "compose" / "compose.yaml")["services"]
    return services


NATS_NODES = ("nats-1", "nats-2", "nats-3")


def test_compose_prepares_before_two_replicas_of_every_service() -> None:
    services = compose_services()
    expected = {
        "postgres", *NATS_NODES, "prepare", "prometheus", "grafana",
        *(f"{name}-{replica}" for name, _, _ in SERVICES for replica in (1, 2)),
    }  # fmt: skip
    assert expected <= set(services)
    assert "omni migrate" in services["prepare"]["command"][-1]
    assert "omni provision-streams" in services["prepare"]["command"][-1]
    prepare_needs = services["prepare"]["depends_on"]
    for needed in ("postgres", *NATS_NODES):
        assert prepare_needs[needed]["condition"] == "service_healthy", needed
    published: list[str] = []
    for name, grpc_port, metrics_port in SERVICES:
        for replica in (1, 2):
            service = services[f"{name}-{replica}"]
            assert service["command"] == ["python", "-m", f"services.{name}"]
            condition = service["depends_on"]["prepare"]["condition"]
            assert condition == "service_completed_successfully", name
            assert service["environment"]["OMNI_GRPC_HOST"] == "0.0.0.0"
            # `<name>` resolves to both replicas: the address other services call.
            assert name in service["networks"]["default"]["aliases"]
            test = service["healthcheck"]["test"]
            assert test[1:4] == ["python", "/app/deploy/docker/healthcheck.py", str(grpc_port)]
            published += service.get("ports", [])
        # Replica 1 publishes its ports on the loopback interface; replica 2 none.
        assert services[f"{name}-1"]["ports"] == [
            f"127.0.0.1:{grpc_port}:{grpc_port}",
            f"127.0.0.1:{metrics_port}:{metrics_port}",
        ]
        assert "ports" not in services[f"{name}-2"]
    host_ports = [port.rsplit(":", 2)[-2] for port in published]
    assert len(host_ports) == len(set(host_ports)), "two replicas publish the same host port"
    # The reservation service calls the ledger by the alias of its replicas;
    # routing calls the ledger and the reservation service.
    for replica in (1, 2):
        reservation = services[f"reservation-{replica}"]
        routing = services[f"routing-{replica}"]
        assert reservation["environment"]["OMNI_LEDGER_TARGET"] == "ledger:50051"
        assert routing["environment"]["OMNI_LEDGER_TARGET"] == "ledger:50051"
        assert routing["environment"]["OMNI_RESERVATION_TARGET"] == "reservation:50052"
        assert {"ledger-1", "ledger-2", "reservation-1", "reservation-2"} <= set(
            routing["depends_on"]
        )


def test_compose_runs_a_three_node_jetstream_cluster_with_r3_streams() -> None:
    services = compose_services()
    nats_url = services["prepare"]["environment"]["OMNI_NATS_URL"]
    assert nats_url == ",".join(f"nats://{node}:4222" for node in NATS_NODES)
    names = set()
    for node in NATS_NODES:
        command = services[node]["command"]
        assert command[:2] == ["--config", "/etc/nats/nats.conf"]
        names.add(command[command.index("--name") + 1])
        assert any(v.endswith(":/data") for v in services[node]["volumes"]), node
    assert names == set(NATS_NODES), "every server needs its own name"
    assert len({v for n in NATS_NODES for v in services[n]["volumes"]}) == 1 + len(NATS_NODES)
    conf = (DEPLOY / "compose" / "nats.conf").read_text(encoding="utf-8")
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, flags=re.MULTILINE)
    assert re.search(r"^jetstream\s*\{", conf, flags=re.MULTILINE)
    cluster = re.search(r"^cluster\s*\{(.*?)^\}", conf, flags=re.MULTILINE | re.DOTALL)
    assert cluster is not None
    routes = set(re.findall(r"nats-route://([\w-]+):6222", cluster.group(1)))
    assert routes == set(NATS_NODES)
    # `prepare` provisions the cluster's declarations (replicas: 3) in place of
    # the image's single-server ones.
    mount = "../nats/streams.cluster.yaml:/app/deploy/nats/streams.yaml:ro"
    assert mount in services["prepare"]["volumes"]


def test_compose_provisions_grafana_with_the_dashboard() -> None:
    grafana = compose_services()["grafana"]
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "omnistock.yaml")
    path = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["../grafana/omnistock-overview.json"].startswith(path + "/")
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"


def test_stream_declarations_for_the_cluster_are_the_dev_ones_at_three_replicas() -> None:
    single = load_yaml(DEPLOY / "nats" / "streams.yaml")["streams"]
    cluster = load_yaml(DEPLOY / "nats" / "streams.cluster.yaml")["streams"]
    assert all(stream["replicas"] == 1 for stream in single)
    assert all(stream["replicas"] == 3 for stream in cluster)
    assert [{**stream, "replicas": 3} for stream in single] == cluster
    configmap = k8s_documents()["ConfigMap/omnistock-streams"]
    assert yaml.safe_load(configmap["data"]["streams.yaml"])["streams"] == cluster


def test_prometheus_scrapes_every_service() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    for name, _, metrics_port in SERVICES:
        replicas = [f"{name}-{replica}:{metrics_port}" for replica in (1, 2)]
        assert targets[f"omnistock-{name}"] == replicas


def test_kustomization_lists_existing_files_but_not_the_secret_example() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / resource).is_file() for resource in resources), resources
    assert "secret.example.yaml" not in resources
    listed = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == set(resources)
    for folder in ("postgres", "monitoring"):
        resources = load_yaml(K8S / folder / "kustomization.yaml")["resources"]
        present = {p.name for p in (K8S / folder).glob("*.yaml")} - {"kustomization.yaml"}
        assert present == set(resources), folder


# The API groups of the custom resources in deploy/k8s/<folder>/, which
# kubernetes-validate has no schema for (`make deploy-check` validates the
# top-level files only; these tests check what the rest relies on).
CUSTOM_GROUPS = frozenset({"postgresql.cnpg.io", "barmancloud.cnpg.io", "monitoring.coreos.com"})


def test_only_custom_resources_are_left_out_of_kubernetes_validate() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            group = document["apiVersion"].split("/")[0]
            if path.parent == K8S:
                assert group not in CUSTOM_GROUPS, f"{path.name}: move it to a sub-folder"
            else:
                assert group in CUSTOM_GROUPS, f"{path}: plain resources belong in deploy/k8s/"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "kubernetes-validate --strict $$(ls deploy/k8s/*.yaml" in makefile


HEALTHCHECK = ["python", "/app/deploy/docker/healthcheck.py"]
DEPLOYMENTS = [
    ("ledger", 3, 50051, 9101, "omni.ledger.v1.StockLedgerService"),
    ("reservation", 2, 50052, 9102, "omni.reservation.v1.ReservationService"),
    ("routing", 2, 50053, 9103, "omni.routing.v1.OrderRoutingService"),
    ("fulfilment", 2, 50054, 9104, "omni.fulfilment.v1.FulfilmentService"),
]
# The services that call others present a service token (docs/security.md).
CALLERS = {"reservation", "routing"}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's `env` by variable name."""
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize(
    ("name", "min_replicas", "grpc_port", "metrics_port", "health_service"), DEPLOYMENTS
)
def test_deployment_is_hardened_probed_and_drains_gracefully(
    name: str, min_replicas: int, grpc_port: int, metrics_port: int, health_service: str
) -> None:
    objects = k8s_documents()
    deployment = objects[f"Deployment/omnistock-{name}"]
    pod = deployment["spec"]["template"]["spec"]
    # The service's own shutdown: 10 s gRPC grace, then up to 10 s for relay and consumers.
    assert pod["terminationGracePeriodSeconds"] > 20
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "preStop" not in container.get("lifecycle", {})
    # gRPC health through the TLS-aware script: readiness asks for the service
    # (NOT_SERVING first on shutdown), liveness and startup for the server.
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:4] == [*HEALTHCHECK, str(grpc_port), health_service]
    for probe in ("livenessProbe", "startupProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == [*HEALTHCHECK, str(grpc_port)] and health_service not in command
    server_name = readiness[readiness.index("--server-name") + 1]
    assert server_name == f"omnistock-{name}.omnistock.svc.cluster.local"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == name  # becomes service="<name>" when scraped
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service_ports = {
        p["name"]: p["port"] for p in objects[f"Service/omnistock-{name}"]["spec"]["ports"]
    }
    assert service_ports == {"grpc": grpc_port, "metrics": metrics_port}
    assert f"Service/omnistock-{name}-headless" in objects
    budget = objects[f"PodDisruptionBudget/omnistock-{name}"]["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"] == deployment["spec"]["selector"]


@pytest.mark.parametrize(("name", "min_replicas"), [(d[0], d[1]) for d in DEPLOYMENTS])
def test_deployment_is_scaled_by_its_autoscaler(name: str, min_replicas: int) -> None:
    objects = k8s_documents()
    deployment = objects[f"Deployment/omnistock-{name}"]
    # A count in the Deployment would undo the autoscaler on every apply.
    assert "replicas" not in deployment["spec"]
    autoscaler = objects[f"HorizontalPodAutoscaler/omnistock-{name}"]
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    spec = autoscaler["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": f"omnistock-{name}",
    }  # fmt: skip
    assert spec["minReplicas"] == min_replicas >= 2
    assert spec["maxReplicas"] > spec["minReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"], "utilization needs a CPU request"


@pytest.mark.parametrize("name", [d[0] for d in DEPLOYMENTS])
def test_deployment_migrates_before_its_code_and_reads_the_database_secret(name: str) -> None:
    pod = k8s_documents()[f"Deployment/omnistock-{name}"]["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert migrate["command"] == ["omni", "migrate"]
    assert migrate["image"] == container["image"]
    for each in (migrate, container):
        reference = env_of(each)["OMNI_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": "omnistock-db-app", "key": "uri"}, each["name"]
        # Only the ConfigMap is passed whole; Secrets key by key.
        assert each["envFrom"] == [{"configMapRef": {"name": "omnistock-config"}}], each["name"]


@pytest.mark.parametrize("name", [d[0] for d in DEPLOYMENTS])
def test_deployment_mounts_its_security_files(name: str) -> None:
    objects = k8s_documents()
    pod = objects[f"Deployment/omnistock-{name}"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted_file(variable: str, volume: str, secret: str) -> None:
        path = env[variable]["value"]
        assert path.startswith(mounts[volume] + "/"), variable
        assert volumes[volume]["secret"]["secretName"] == secret, variable
        items = volumes[volume]["secret"].get("items")
        if items:
            assert path.rsplit("/", 1)[1] in {item["path"] for item in items}, variable

    mounted_file("OMNI_AUTH_JWKS_FILE", "auth", "omnistock-auth")
    for variable in ("OMNI_TLS_CERT_FILE", "OMNI_TLS_KEY_FILE", "OMNI_TLS_CA_FILE"):
        mounted_file(variable, "tls", f"omnistock-{name}-tls")
    if name in CALLERS:
        mounted_file("OMNI_SERVICE_TOKEN_FILE", "service-token", "omnistock-service-tokens")
        (item,) = volumes["service-token"]["secret"]["items"]
        assert item["key"] == name, "a service mounts its own token only"
    else:
        assert "OMNI_SERVICE_TOKEN_FILE" not in env and "service-token" not in volumes
    for variable in ("OMNI_NATS_USER", "OMNI_NATS_PASSWORD"):
        reference = env[variable]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": "omnistock-secrets", "key": variable, "optional": True}
    config = objects["ConfigMap/omnistock-config"]["data"]
    assert config["OMNI_ENVIRONMENT"] == "production"
    assert config["OMNI_TLS_CLIENT_AUTH"] in {"none", "require"}
    assert config["OMNI_AUTH_ISSUER"] and config["OMNI_AUTH_AUDIENCE"]


def test_prepare_job_migrates_then_provisions_the_cluster_streams() -> None:
    objects = k8s_documents()
    pod = objects["Job/omnistock-prepare"]["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    (provision,) = pod["containers"]
    assert migrate["command"] == ["omni", "migrate"]
    assert provision["command"] == ["omni", "provision-streams"]
    reference = env_of(migrate)["OMNI_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "omnistock-db-app", "key": "uri"}
    (streams,) = [m for m in provision["volumeMounts"] if m["name"] == "streams"]
    assert streams["mountPath"] == "/app/deploy/nats/streams.yaml"
    assert streams["subPath"] == "streams.yaml"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "streams"]
    assert volume["configMap"]["name"] == "omnistock-streams"


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
    reference = env_of(container)[variable]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "omnistock-secrets", "key": variable}
    for name, _, _, _, _ in DEPLOYMENTS:
        if name != "fulfilment":
            pod = objects[f"Deployment/omnistock-{name}"]["spec"]["template"]["spec"]
            (other,) = pod["containers"]
            assert variable not in env_of(other), name
    services = compose_services()
    for name, _, _ in SERVICES:
        for replica in (1, 2):
            environment = services[f"{name}-{replica}"]["environment"]
            assert bool(environment.get(variable)) == (name == "fulfilment"), name


# -- PromQL ------------------------------------------------------------------------


def test_every_rule_and_dashboard_query_parses_as_promql() -> None:
    queries = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in rules()]
    queries += dashboard_queries()
    assert len(queries) > 100
    for title, expr in queries:
        try:
            selected = parsed_metric_names(expr)
        except ValueError as error:
            pytest.fail(f"{title}: not valid PromQL: {error}\n{expr}")
        # The parser and the quick extraction the checks above rely on agree.
        assert selected == metric_names(expr), title


def test_promql_parser_rejects_what_prometheus_rejects() -> None:
    assert parsed_metric_names('rate(a_total{x="$service"}[$__rate_interval])') == {"a_total"}
    for broken in ("sum(rate(a_total[5m])", "rate(a_total)", 'a{b=~"("}'):
        with pytest.raises(ValueError):
            parse_promql(broken)


# -- Alerts: what the issue asks for, each tested both ways -------------------------

# The concerns the alerts must cover, by the alert that covers them.
REQUIRED_ALERTS = {
    "RPC error ratio per service (SLO, fast burn)": "OmnistockServiceErrorBudgetBurnFast",
    "RPC error ratio per service (SLO, slow burn)": "OmnistockServiceErrorBudgetBurnSlow",
    "RPC p99 latency per service (SLO)": "OmnistockServiceLatencySloMissed",
    "outbox backlog growing": "OmnistockOutboxBacklogGrowing",
    "consumer lag": "OmnistockConsumerLagHigh",
    "dead letters": "OmnistockConsumerDeadLetters",
    "reservation failures spiking": "OmnistockReservationFailuresSpiking",
    "expiry sweeper stalled": "OmnistockSweeperStalled",
    "availability propagation lag": "OmnistockReservationProjectionLagHigh",
    "orders needing attention": "OmnistockRoutingOrdersNeedAttention",
}
# Per-service recording rules behind the SLO alerts.
SLO_RECORDS = {
    "service:grpc_server_handled:rate5m",
    "service:grpc_server_server_errors:ratio_rate5m",
    "service:grpc_server_server_errors:ratio_rate30m",
    "service:grpc_server_server_errors:ratio_rate1h",
    "service:grpc_server_server_errors:ratio_rate6h",
    "service:grpc_server_handling_seconds:p99_5m",
    "service:grpc_server_slow_calls:ratio_rate5m",
    "service:grpc_server_slow_calls:ratio_rate1h",
}


def test_the_required_alerts_and_slo_recording_rules_exist() -> None:
    names = {alert["alert"] for alert in alerts()}
    missing = {concern: name for concern, name in REQUIRED_ALERTS.items() if name not in names}
    assert not missing, missing
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert SLO_RECORDS <= recorded, sorted(SLO_RECORDS - recorded)
    by_name = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for record in SLO_RECORDS:
        # Per service: grouped by job and service (and le for a quantile), nothing finer.
        groups = grouping(by_name[record])
        assert groups and all(g - {"le"} == {"job", "service"} for g in groups), record
    sweeper = next(a for a in alerts() if a["alert"] == "OmnistockSweeperStalled")
    assert "expiry" in sweeper["annotations"]["description"]


def test_every_alert_has_a_promtool_case_that_fires_and_one_that_stays_silent() -> None:
    document = load_yaml(RULES_TEST_FILE)
    assert document["rule_files"] == ["rules.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert names - fires == set(), "alerts no test sees firing"
    assert names - silent == set(), "alerts no test sees staying silent"
    assert (fires | silent) <= names, "tests of alerts that do not exist"


# -- Dashboard: what operators look at ----------------------------------------------

# Each area of the dashboard, with metrics its queries must read.
DASHBOARD_AREAS = {
    "stock flow": {"omni_ledger_movements_total", "omni_ledger_movement_units_total"},
    "reservations": {
        "omni_reservation_reserve_total",
        "omni_reservation_active_holds",
        "omni_reservation_expired_total",
        "omni_reservation_short_lines_total",
    },
    "routing outcomes": {
        "omni_routing_orders_total",
        "omni_routing_reroutes_total",
        "omni_routing_orders_awaiting_attention",
        "omni_routing_replans_total",
    },
    "fulfilment queues": {"omni_fulfilment_open_tasks"},
    "event lag": {
        "omni_consumer_pending_messages",
        "omni_outbox_backlog_events",
        "omni_outbox_oldest_unpublished_age_seconds",
        "omni_reservation_movement_to_availability_seconds_bucket",
    },
    "RPC golden signals": {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket"},
}


def test_dashboard_covers_every_area() -> None:
    used = {name for _, expr in dashboard_queries() for name in parsed_metric_names(expr)}
    for area, metrics in DASHBOARD_AREAS.items():
        assert metrics <= used, f"{area}: no panel reads {sorted(metrics - used)}"


def grouping(expr: str) -> set[frozenset[str]]:
    """The label sets the aggregations of ``expr`` group by."""
    found: set[frozenset[str]] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.add(frozenset(node.modifier.labels))
        return True

    promql_parser.walk(parse_promql(expr), visit)
    return found


def test_dashboard_breaks_down_queues_and_rpcs() -> None:
    queries = dashboard_queries()

    def groupings_of(metric: str) -> set[frozenset[str]]:
        return {g for _, e in queries if metric in parsed_metric_names(e) for g in grouping(e)}

    # Fulfilment queues per location kind and status.
    assert frozenset({"kind", "status"}) in groupings_of("omni_fulfilment_open_tasks")
    # Rate and errors per service and method; p99 per service and method and per service.
    assert frozenset({"service", "grpc_method"}) in groupings_of("grpc_server_handled_total")
    latency = groupings_of("grpc_server_handling_seconds_bucket")
    assert {frozenset({"service", "grpc_method", "le"}), frozenset({"service", "le"})} <= latency
    assert any(
        p["type"] == "heatmap"
        and any(
            "omni_reservation_movement_to_availability_seconds_bucket" in t["expr"]
            for t in p["targets"]
        )
        for p in all_panels(dashboard()["panels"])
    ), "the propagation histogram is shown as a heatmap"


# -- Custom resources: CloudNativePG, Prometheus Operator ---------------------------


def test_postgres_is_a_cloudnativepg_cluster_with_backups() -> None:
    objects = k8s_documents(K8S / "postgres")
    cluster = objects["Cluster/omnistock-db"]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 3
    assert spec["bootstrap"]["initdb"] == {**spec["bootstrap"]["initdb"], "database": "omnistock"}
    # The operator names the app user's Secret <cluster>-app, with the DSN as `uri`:
    # exactly what every Deployment and the Job read.
    assert "secret" not in spec["bootstrap"]["initdb"]
    assert f"{cluster['metadata']['name']}-app" == "omnistock-db-app"
    assert spec["postgresql"]["synchronous"]["number"] >= 1
    assert spec["postgresql"]["synchronous"]["dataDurability"] == "required"
    assert spec["storage"]["size"] and spec["walStorage"]["size"]
    assert {"cpu", "memory"} <= set(spec["resources"]["requests"])
    assert spec["affinity"]["enablePodAntiAffinity"] is True
    connections = int(spec["postgresql"]["parameters"]["max_connections"])
    autoscalers = [o for o in k8s_documents().values() if o["kind"] == "HorizontalPodAutoscaler"]
    assert connections > 10 * sum(a["spec"]["maxReplicas"] for a in autoscalers)
    (plugin,) = spec["plugins"]
    assert plugin["name"] == "barman-cloud.cloudnative-pg.io" and plugin["isWALArchiver"] is True
    store = objects[f"ObjectStore/{plugin['parameters']['barmanObjectName']}"]
    assert store["apiVersion"] == "barmancloud.cnpg.io/v1"
    assert re.fullmatch(r"[1-9][0-9]*[dwm]", store["spec"]["retentionPolicy"])
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    backup = objects["ScheduledBackup/omnistock-db-nightly"]
    assert backup["apiVersion"] == "postgresql.cnpg.io/v1"
    assert backup["spec"]["cluster"]["name"] == "omnistock-db"
    assert backup["spec"]["method"] == "plugin"
    assert backup["spec"]["pluginConfiguration"]["name"] == plugin["name"]
    assert len(backup["spec"]["schedule"].split()) == 6  # seconds first


def test_servicemonitor_scrapes_every_service_with_the_rules_labels() -> None:
    (monitor,) = k8s_documents(K8S / "monitoring").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    spec = monitor["spec"]
    assert spec["namespaceSelector"]["matchNames"] == ["omnistock"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["honorLabels"] is True
    objects = k8s_documents()
    selected = [
        o
        for o in objects.values()
        if o["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
        and any(
            o["metadata"]["labels"].get(e["key"]) in e["values"]
            for e in spec["selector"]["matchExpressions"]
        )
    ]
    with_port = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]
        for o in selected
        if endpoint["port"] in {p["name"] for p in o["spec"]["ports"]}
    }
    assert with_port == {name for name, _, _ in SERVICES}
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    source = ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    assert relabel["service"]["sourceLabels"] == source
    assert relabel["job"]["sourceLabels"] == source
    assert relabel["job"]["replacement"] == "omnistock-$1"


def test_nats_helm_values_make_a_three_node_jetstream_cluster_on_files() -> None:
    values = load_yaml(DEPLOY / "nats" / "helm-values.yaml")
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True and jetstream["fileStore"]["pvc"]["enabled"]
    assert jetstream["memoryStore"]["enabled"] is False
    assert jetstream["merge"]["sync_interval"] == "always"
    spread = values["podTemplate"]["topologySpreadConstraints"]
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert values["podDisruptionBudget"]["enabled"] is True
    # The services connect to the release this file installs.
    url = k8s_documents()["ConfigMap/omnistock-config"]["data"]["OMNI_NATS_URL"]
    assert url == "nats://nats.nats.svc.cluster.local:4222"
