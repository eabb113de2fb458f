"""Observability end to end: a real Prometheus, ``promtool check metrics``, JSON logs.

One process stack of its own (JSON logs, as in production) and one real
``prometheus`` server (Debian's package) scraping the four services every
second, with deploy/prometheus/rules.yml loaded. Traffic flows through all
four services (master data, receipts, a rejected and rerouted ship-from-store
order, a click-and-collect order with a wrong and then the right pickup code,
an availability watcher, a refused batch), and then:

- every rule of rules.yml is loaded by Prometheus and evaluates without error;
- every series the alert rules and the Grafana dashboard read (except the ones
  the rules record) exists in Prometheus;
- the key counters go up, per service, when a second wave of traffic flows;
- ``promtool check metrics`` finds nothing to complain about on any
  service's ``/metrics``;
- every line the services log is a JSON object, and the correlation id the
  client sent with one click-and-collect order shows up in the logs of all
  four services, carried there by events and by routing's own gRPC calls (the
  hold routing places carries the order's id).

Prometheus's storage lives in a temporary folder outside pytest's temporary
root (another pytest session prunes old folders there).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import events_pb2 as reservation_events
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.routing.v1 import resources_pb2 as routing_res
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.logs import CORRELATION_HEADER
from omnistock.messaging.envelope import unpack
from omnistock.settings import ServiceName
from services.registry import REPO_ROOT
from tests.deploy_metrics import DEPLOY, RULES_FILE, exported_names_in_use, load_yaml, rules
from tests.e2e.harness import (
    SERVICES,
    Place,
    ProcessStack,
    ScenarioNetwork,
    assert_consistent,
    eventually,
    open_process_stack,
    order_of,
    ship_task,
    task_for,
)
from tests.e2e.test_flows import ready_event
from tests.e2e.test_processes import AMSTERDAM, NIEUWEGEIN, UTRECHT

# Counters that every piece of traffic below moves, and the services (jobs) in
# which each must move: the one that answers the RPC or owns the domain, or all
# four for the shared runtime (every service publishes and consumes events).
KEY_COUNTERS: dict[str, tuple[ServiceName, ...]] = {
    "grpc_server_handled_total": SERVICES,
    "grpc_server_handling_seconds_count": SERVICES,
    "omni_outbox_published_total": SERVICES,
    "omni_consumer_messages_total": SERVICES,
    "omni_ledger_movements_total": ("ledger",),
    "omni_reservation_reserve_total": ("reservation",),
    "omni_routing_orders_total": ("routing",),
    "omni_fulfilment_steps_total": ("fulfilment",),
}

# The harness writes this banner into a service's log before each start.
_BANNER = "===== "


# -- Prometheus ------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A running ``prometheus`` server and a small client of its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    async def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        address = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")

        def fetch() -> Any:
            with urllib.request.urlopen(address, timeout=5) as response:
                return json.load(response)

        body = await asyncio.to_thread(fetch)
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) of every series of the answer."""
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(series["metric"], float(series["value"][1])) for series in data["result"]]

    async def per_job(self, metric: str) -> dict[str, float]:
        """``sum by (job) (metric)``, keyed by job."""
        return {
            labels["job"]: value for labels, value in await self.query(f"sum by (job) ({metric})")
        }

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's own log."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def scrape_config(stack: ProcessStack) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the stack's metrics ports as targets.

    The jobs keep what the deployment gives them (names, labels, honor_labels),
    so the rules and the dashboard see the labels they are written for; only the
    targets, the intervals (1 s) and the path of the rules file change.
    """
    deployed = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs: list[dict[str, Any]] = []
    for job in deployed["scrape_configs"]:
        service = job["job_name"].removeprefix("omnistock-")
        if service not in stack.services:
            continue  # Prometheus itself, or anything that is not one of ours
        (static,) = job["static_configs"]
        target = f"127.0.0.1:{stack.services[service].metrics_port}"
        labels = static.get("labels", {})
        jobs.append({**job, "static_configs": [{"targets": [target], "labels": labels}]})
    assert sorted(job["job_name"] for job in jobs) == sorted(f"omnistock-{s}" for s in SERVICES)
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": jobs,
    }


@pytest.fixture(scope="module")
async def stack(
    e2e_servers: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProcessStack]:
    """A stack of the module's own: fresh counters, and JSON logs as in production."""
    log_dir = tmp_path_factory.mktemp("observability")
    async with open_process_stack(e2e_servers, log_dir, {"OMNI_LOG_FORMAT": "json"}) as stack:
        yield stack


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Debian's ``prometheus`` server (the same package carries ``promtool``)."""
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("the prometheus server is missing: apt-get install prometheus (Debian)")
    return found


@pytest.fixture(scope="module")
def promtool_binary() -> str:
    """Debian's ``promtool``."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (Debian)")
    return found


@pytest.fixture(scope="module")
async def prometheus(
    stack: ProcessStack, prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Prometheus]:
    """A real Prometheus scraping the stack every second, with the alert rules loaded."""
    log_path = tmp_path_factory.mktemp("prometheus") / "prometheus.log"
    with tempfile.TemporaryDirectory(prefix="omnistock-prometheus-") as folder:
        config = Path(folder) / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(stack), sort_keys=False))
        port = free_port()
        process = _start_prometheus(prometheus_binary, Path(folder), port, log_path)
        server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        try:
            await _wait_ready(server)
            yield server
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


def _start_prometheus(
    binary: str, folder: Path, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``prometheus`` with ``folder``'s config and storage, logging to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _wait_ready(server: Prometheus, within: float = 30.0) -> None:
    deadline = time.monotonic() + within

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    while not await asyncio.to_thread(ready):
        if server.process.poll() is not None:
            raise RuntimeError(
                f"prometheus exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"prometheus not ready within {within} s:\n{server.log_tail()}")
        await asyncio.sleep(0.2)


async def poll(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    *,
    what: str,
    within: float = 20.0,
) -> Any:
    """Ask Prometheus (``probe``) until ``accept`` takes the answer; fail naming the last one."""
    return await eventually(probe, accept, within=within, interval=0.25, what=what)


async def scraped_since(server: Prometheus, moment: float) -> None:
    """Wait until Prometheus has scraped every service successfully after the Unix time
    ``moment``."""

    async def scrapes() -> dict[str, float]:
        found = await server.query('timestamp(up{job=~"omnistock-.*"}) and up == 1')
        return {labels["job"]: at for labels, at in found}

    await poll(
        scrapes,
        lambda found: len(found) == len(SERVICES) and min(found.values()) > moment,
        what=f"a successful scrape of every service after {moment}",
    )


# -- traffic ---------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the first wave of traffic left behind."""

    net: ScenarioNetwork
    sku: str
    correlation_id: str  # sent by the client with every call of the click-and-collect order
    order_id: str  # that order


def correlated(correlation_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying a client's correlation id."""
    return ((CORRELATION_HEADER, correlation_id),)


async def click_and_collect(
    stack: ProcessStack, net: ScenarioNetwork, sku: str, correlation_id: str
) -> str:
    """A click-and-collect order from the Utrecht store's shelf, every call of it sent
    with ``correlation_id``: route, accept, pick, ready, a wrong code, the right code.
    Returns the order id once routing counts it fulfilled."""
    metadata = correlated(correlation_id)
    call = stack.routing.RouteOrder(net.order([(sku, 1)], pickup="utrecht"), metadata=metadata)
    echoed = dict(await call.initial_metadata())
    assert echoed.get(CORRELATION_HEADER) == correlation_id, echoed
    routed = (await call).order
    task = await task_for(stack, net.id("utrecht"), routed.order_id)
    assert task.type == fulfilment_res.FULFILMENT_TYPE_PICKUP_AT_STORE
    fulfilment, task_id = stack.fulfilment, task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(
            request_id=net.request_id("accept"), fulfilment_id=task_id
        ),
        metadata=metadata,
    )
    await fulfilment.ConfirmPick(
        fulfilment_pb.ConfirmPickRequest(
            request_id=net.request_id("pick"),
            fulfilment_id=task_id,
            lines=[fulfilment_pb.PickedLine(sku=sku, picked_quantity=1)],
        ),
        metadata=metadata,
    )
    await fulfilment.MarkReadyForPickup(
        fulfilment_pb.MarkReadyForPickupRequest(
            request_id=net.request_id("ready"), fulfilment_id=task_id
        ),
        metadata=metadata,
    )
    code = (await ready_event(stack, task_id)).pickup_code
    wrong = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fulfilment.CollectFulfilment(
            fulfilment_pb.CollectFulfilmentRequest(
                request_id=net.request_id("collect"), fulfilment_id=task_id, pickup_code=wrong
            ),
            metadata=metadata,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await fulfilment.CollectFulfilment(
        fulfilment_pb.CollectFulfilmentRequest(
            request_id=net.request_id("collect"), fulfilment_id=task_id, pickup_code=code
        ),
        metadata=metadata,
    )
    await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda order: order.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the click-and-collect order is fulfilled",
    )
    return routed.order_id


async def rejected_then_shipped(stack: ProcessStack, net: ScenarioNetwork, sku: str) -> None:
    """A home delivery the nearest store rejects; routing sends it to the other store,
    which ships it."""
    routed = (await stack.routing.RouteOrder(net.order([(sku, 1)], to=NIEUWEGEIN))).order
    first = await task_for(stack, net.id("utrecht"), routed.order_id)
    await stack.fulfilment.RejectFulfilment(
        fulfilment_pb.RejectFulfilmentRequest(
            request_id=net.request_id("reject"),
            fulfilment_id=first.fulfilment_id,
            reason_code="NO_STAFF",
        )
    )
    await ship_task(stack, await task_for(stack, net.id("amsterdam"), routed.order_id))
    await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda order: order.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the rerouted order is fulfilled",
    )


async def shipped_from_store(stack: ProcessStack, net: ScenarioNetwork, sku: str) -> None:
    """A home delivery the Utrecht store ships."""
    routed = (await stack.routing.RouteOrder(net.order([(sku, 1)], to=NIEUWEGEIN))).order
    await ship_task(stack, await task_for(stack, net.id("utrecht"), routed.order_id))
    await eventually(
        lambda: order_of(stack, routed.order_id),
        lambda order: order.status == routing_res.ORDER_STATUS_FULFILLED,
        what="the order is fulfilled",
    )


async def refused_batch(stack: ProcessStack, net: ScenarioNetwork) -> None:
    """A scanner posts a receipt of a SKU nobody created: refused whole."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.ledger.PostMovements(
            ledger_pb.PostMovementsRequest(
                movements=[
                    ledger_res.MovementInput(
                        key=net.next_key(),
                        sku=f"NO-SUCH-SKU-{net.tag}",
                        location_id=net.id("utrecht"),
                        receipt=ledger_res.Receipt(quantity=1),
                    )
                ]
            )
        )
    assert refused.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    )


@pytest.fixture(scope="module")
async def traffic(stack: ProcessStack) -> Traffic:
    """The first wave: master data, receipts watched by a channel, a rejected and
    rerouted order, a click-and-collect order with a known correlation id, a refused
    batch. Everything settled (consistent) when it returns."""
    net = await ScenarioNetwork(stack).build(
        [Place("utrecht", "store", UTRECHT), Place("amsterdam", "store", AMSTERDAM)]
    )
    (sku,) = net.skus
    # A channel watches the SKU (once the reservation service knows it) while it arrives.
    await eventually(lambda: net.available(sku, "utrecht"), lambda _: True, what=f"{sku} known")
    watch = stack.reservations.WatchAvailability(
        reservation_pb.WatchAvailabilityRequest(channel=net.channel, skus=[sku])
    )
    try:
        await net.receive(sku, "utrecht", 10)
        await net.receive(sku, "amsterdam", 10)
        # The watcher's snapshot, then the receipts' figures.
        async with asyncio.timeout(20):
            async for update in watch:
                if not update.snapshot:
                    break
    finally:
        watch.cancel()
    await rejected_then_shipped(stack, net, sku)
    correlation_id = f"obs-{uuid.uuid4()}"
    order_id = await click_and_collect(stack, net, sku, correlation_id)
    await refused_batch(stack, net)
    await assert_consistent(stack, skus=[sku], channels=[net.channel])
    return Traffic(net, sku, correlation_id, order_id)


# -- Prometheus: rules, series, movement -----------------------------------------------


def unix_time(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds and all) as Unix seconds."""
    whole, _, fraction = stamp.removesuffix("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return seconds + float(f"0.{fraction or 0}")


async def test_prometheus_loads_every_alert_and_recording_rule_and_evaluates_it(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    expected = {rule.get("alert") or rule["record"] for rule in rules()}
    # Evaluated against real series: a rule that only fails on data (a vector
    # matching error, say) evaluates fine while nothing has been scraped. Once a
    # scrape of every service is queryable, any evaluation starting later sees it.
    await scraped_since(prometheus, time.time())
    scraped_at = time.time()

    async def loaded() -> list[dict[str, Any]]:
        data = await prometheus.api("rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    found = await poll(
        loaded,
        lambda found: (
            {r["name"] for r in found} == expected
            and all(unix_time(r["lastEvaluation"]) > scraped_at for r in found)
        ),
        what="every rule of rules.yml loaded and evaluated after a scrape of every service",
    )
    failing = {r["name"]: r.get("lastError") for r in found if r["health"] != "ok"}
    assert not failing, f"rules that do not evaluate: {failing}"


async def test_every_series_the_rules_and_the_dashboard_read_is_scraped(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    wanted = exported_names_in_use()
    assert {"up", "grpc_server_handled_total", "omni_outbox_published_total"} <= wanted
    selector = "|".join(sorted(wanted))

    async def present() -> set[str]:
        found = await prometheus.query(f'group by (__name__) ({{__name__=~"{selector}"}})')
        return {labels["__name__"] for labels, _ in found}

    try:
        await poll(present, lambda names: names >= wanted, what="every series in Prometheus")
    except AssertionError:
        missing = sorted(wanted - await present())
        raise AssertionError(
            f"series the rules or the dashboard read but Prometheus does not have: {missing}"
        ) from None
    targets = await prometheus.query('up{job=~"omnistock-.*"}')
    assert {labels["service"]: value for labels, value in targets} == dict.fromkeys(SERVICES, 1.0)


async def test_key_counters_go_up_in_every_service_when_traffic_flows(
    stack: ProcessStack, prometheus: Prometheus, traffic: Traffic
) -> None:
    # The first wave has settled; once Prometheus has scraped every service after
    # that, what it holds is the "before".
    await scraped_since(prometheus, time.time())
    before = {name: await prometheus.per_job(name) for name in KEY_COUNTERS}
    for name, services in KEY_COUNTERS.items():
        jobs = {f"omnistock-{service}" for service in services}
        assert jobs <= set(before[name]), (
            f"{name}: no series for {sorted(jobs - set(before[name]))}"
        )

    net, sku = traffic.net, traffic.sku
    await net.receive(sku, "utrecht", 1)
    await shipped_from_store(stack, net, sku)

    async def counters() -> dict[str, dict[str, float]]:
        return {name: await prometheus.per_job(name) for name in KEY_COUNTERS}

    def still(now: Mapping[str, Mapping[str, float]]) -> list[str]:
        """The (counter, job)s that have not gone up yet."""
        return [
            f"{name} in {job}"
            for name, services in KEY_COUNTERS.items()
            for job in (f"omnistock-{service}" for service in services)
            if now[name].get(job, 0.0) <= before[name][job]
        ]

    try:
        await poll(counters, lambda now: not still(now), what="every key counter went up")
    except AssertionError:
        now = await counters()
        raise AssertionError(f"not gone up: {still(now)}; before: {before}; now: {now}") from None


# -- promtool check metrics ------------------------------------------------------------


def scrape(port: int) -> bytes:
    """A service's ``/metrics`` page, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body


async def test_promtool_check_metrics_is_clean_on_every_service(
    stack: ProcessStack, traffic: Traffic, promtool_binary: str
) -> None:
    for name, run in stack.services.items():
        text = await asyncio.to_thread(scrape, run.metrics_port)
        assert b"omni_outbox_published_total" in text, f"{name}: not the service's metrics"
        checked = await asyncio.to_thread(
            subprocess.run, [promtool_binary, "check", "metrics"], input=text, capture_output=True
        )
        problems = (checked.stdout + checked.stderr).decode().strip()
        assert checked.returncode == 0 and not problems, f"{name}: promtool says:\n{problems}"


# -- logs ------------------------------------------------------------------------------


def log_records(stack: ProcessStack, name: ServiceName) -> Iterator[tuple[str, Any]]:
    """(line, parsed JSON or None) of every line a service logged (banners skipped)."""
    for line in stack.services[name].log_path.read_text(errors="replace").splitlines():
        if not line.strip() or line.startswith(_BANNER):
            continue
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            yield line, None


async def test_every_service_logs_json_lines(stack: ProcessStack, traffic: Traffic) -> None:
    for name in SERVICES:
        records = list(log_records(stack, name))
        assert records, f"{name} logged nothing"
        not_json = [line for line, record in records if not isinstance(record, dict)]
        assert not not_json, f"{name} logged lines that are not JSON objects: {not_json[:5]}"
        for line, record in records:
            assert record.get("service") == name, f"{name}: no service field in {line}"
            assert {"event", "level", "timestamp"} <= record.keys(), line


async def test_the_clients_correlation_id_follows_an_order_through_all_four_services(
    stack: ProcessStack, traffic: Traffic
) -> None:
    """The client sent its id with the click-and-collect order's calls (to routing and
    fulfilment only). The ledger and the reservation service learn of the order only
    from events; each service's consumers must log the id of the event they handle."""
    wanted = traffic.correlation_id
    # The ledger posts the collection, the reservation service consumes the hold,
    # routing marks the order fulfilled (all from FulfilmentCollected); fulfilment
    # creates the task from OrderRouted.
    consumers: dict[ServiceName, str] = {
        "ledger": "ledger-fulfilment",
        "reservation": "reservation-fulfilment",
        "routing": "routing-fulfilment",
        "fulfilment": "fulfilment-routing",
    }

    def carried() -> dict[ServiceName, set[str]]:
        found: dict[ServiceName, set[str]] = defaultdict(set)
        for name in SERVICES:
            for _, record in log_records(stack, name):
                if isinstance(record, dict) and record.get("correlation_id") == wanted:
                    found[name].add(str(record.get("consumer", record.get("event"))))
        return found

    async def probe() -> dict[ServiceName, set[str]]:
        return carried()

    # The lines are written when the events are handled, which the order's
    # fulfilment already waited for; the poll only absorbs output buffering.
    try:
        await poll(
            probe,
            lambda found: all(consumers[name] in found[name] for name in SERVICES),
            what="the correlation id in every service's consumer logs",
            within=5,
        )
    except AssertionError:
        seen = {name: sorted(carried()[name]) for name in SERVICES}
        raise AssertionError(
            f"correlation id {wanted} of order {traffic.order_id}: expected a line of "
            f"consumer {consumers} in each service; lines carrying it, per service: {seen}"
        ) from None


def test_production_logging_renders_library_lines_as_json_too() -> None:
    """Lines of libraries that log through the standard library (asyncio, grpc,
    asyncpg) come out as JSON objects as well, with the correlation id in scope."""
    script = (
        "import logging\n"
        "from omnistock.logs import configure_logging, correlation_scope, get_logger\n"
        "configure_logging('INFO', 'json', service='ledger')\n"
        "with correlation_scope('cid-1'):\n"
        "    get_logger('omnistock.x').info('ours', n=1)\n"
        "    logging.getLogger('asyncio').warning('theirs %s', 'formatted')\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=REPO_ROOT, timeout=30, check=True
    )
    lines = [json.loads(line) for line in ran.stderr.decode().splitlines()]
    assert [(line["event"], line["correlation_id"], line["service"]) for line in lines] == [
        ("ours", "cid-1", "ledger"),
        ("theirs formatted", "cid-1", "ledger"),
    ]
    assert lines[1]["logger"] == "asyncio" and lines[1]["level"] == "warning"


async def test_the_hold_routing_places_carries_the_orders_correlation_id(
    stack: ProcessStack, traffic: Traffic
) -> None:
    """Routing holds the order's stock by gRPC (Reserve); the hold's ReservationCreated
    event should carry the correlation id of the RouteOrder call that caused it."""
    pool = await stack.pool()
    rows = await pool.fetch(
        "SELECT envelope FROM reservation.outbox WHERE subject = $1",
        "omni.reservation.reservation.created",
    )
    carried = {}
    for row in rows:
        envelope = event_pb2.EventEnvelope.FromString(bytes(row["envelope"]))
        created = unpack(envelope, reservation_events.ReservationCreated)
        if created is not None and created.reservation.reference == traffic.order_id:
            carried[created.reservation.reservation_id] = envelope.correlation_id
    assert carried, f"no ReservationCreated for order {traffic.order_id}"
    assert set(carried.values()) == {traffic.correlation_id}, carried
