"""Benchmark: Reserve throughput and latency, hot SKU versus spread, and availability propagation.

Measured in one run, against one embedded PostgreSQL (fsync on) and nats-server
(JetStream ``sync_interval: always``), with the ledger and the reservation
service each in its own process as in production (``--in-process`` runs both
inside this process instead, as the test harness does):

- Reserve of 1 unit (an order hold, a fresh request id per call) by 1, 16 and 64
  concurrent clients in a closed loop, each client on its own SKU ("distinct")
  and every client on one SKU at one location ("hot"). A hot row admits one
  writer at a time; the service's group commit is meant to make the hot SKU as
  fast as a spread load, and faster than the database's own one-row-per-commit
  turnover.
- Baseline "raw hot-row UPDATE": ``UPDATE ... SET available = available - 1
  WHERE id = 1 AND available >= 1`` on one scratch row through an asyncpg pool,
  one autocommit transaction per call, at the same concurrencies: what the
  database gives a hot row without batching.
- Baseline "no-op gRPC": the standard health Check on the reservation server,
  so through the same grpc.aio server, interceptors and client: the floor of
  any RPC on this machine.
- Propagation: a WatchAvailability stream on one SKU while receipts are posted
  to the ledger one at a time; from the movement's ``recorded_at`` (taken before
  the ledger commits; an upper bound) and from the PostMovements response (after
  it committed; a lower bound) to the figure with the new on-hand arriving on
  the stream. The path is ledger outbox → JetStream → reservation consumer →
  reservation outbox → JetStream → watch hub → stream. Baselines: a core NATS
  publish → receive and one acknowledged JetStream publish on the same server.

Below each Reserve figure the service's own metrics are shown: the mean group
commit batch, transaction and queue time, the server-side handling time, and
how many events per second went into and out of the reservation outbox (events
left unpublished delay every availability update behind them).

The aims printed at the end report; they do not gate (the exit code is 0).

Run: ``make bench`` (or ``python -m benchmarks.reservation_reserve --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg
import grpc
import nats
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    Figure,
    bench_channel,
    bench_stack,
    describe_error,
    measure_for,
    print_latency_table,
    ratio,
    service_process,
)
from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import reservation_service_pb2_grpc as pb_grpc
from omni.reservation.v1 import resources_pb2 as res
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.devstack.supervisor import ServiceProcess
from omnistock.grpc.health import health_check
from omnistock.logs import configure_logging
from omnistock.service import start_service
from omnistock.settings import Settings
from services.ledger.app import SPEC as LEDGER
from services.reservation.app import SPEC as RESERVATION

STOCK = 1_000_000  # units received per SKU: the largest receipt; never runs out here
CALL_TIMEOUT = 10.0  # seconds; a call that takes longer counts as failed
WAIT_WITHIN = 30.0  # seconds to wait for events to reach the reservation service
COMMITTER = "reservation-reserve"
SCRATCH = """
CREATE SCHEMA IF NOT EXISTS bench_scratch;
DROP TABLE IF EXISTS bench_scratch.hot_row;
CREATE TABLE bench_scratch.hot_row (id integer PRIMARY KEY, available bigint NOT NULL);
INSERT INTO bench_scratch.hot_row VALUES (1, 1000000000000);
"""
HOT_ROW_UPDATE = (
    "UPDATE bench_scratch.hot_row SET available = available - 1 WHERE id = $1 AND available >= 1"
)

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Operation = Callable[[int, int], Awaitable[None]]  # (worker, n) -> one call


@dataclass(frozen=True)
class Endpoints:
    """Where the running services answer."""

    ledger: str
    reservation: str
    metrics: Callable[[], Awaitable[str]]  # the Prometheus text of both services


@asynccontextmanager
async def service_processes(stack: EmbeddedStack) -> AsyncIterator[Endpoints]:
    """The ledger and the reservation service, each in its own process."""
    ports = {name: (free_port(), free_port()) for name in ("ledger", "reservation")}
    env = {"OMNI_DATABASE_URL": stack.database_url, "OMNI_NATS_URL": stack.nats_url}
    for name, (grpc_port, metrics_port) in ports.items():
        env[f"OMNI_{name.upper()}_GRPC_PORT"] = str(grpc_port)
        env[f"OMNI_{name.upper()}_METRICS_PORT"] = str(metrics_port)
    ledger = f"127.0.0.1:{ports['ledger'][0]}"
    reservation = f"127.0.0.1:{ports['reservation'][0]}"
    urls = [f"http://127.0.0.1:{metrics_port}/metrics" for _, metrics_port in ports.values()]

    def scrape() -> str:
        texts = []
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                texts.append(response.read().decode())
        return "\n".join(texts)

    async def metrics() -> str:
        return await asyncio.to_thread(scrape)

    with service_process("services.ledger", env):
        await ServiceProcess("ledger", "", ledger, {}).wait_serving()
        with service_process("services.reservation", {**env, "OMNI_LEDGER_TARGET": ledger}):
            await ServiceProcess("reservation", "", reservation, {}).wait_serving()
            yield Endpoints(ledger, reservation, metrics)


@asynccontextmanager
async def services_in_process(stack: EmbeddedStack) -> AsyncIterator[Endpoints]:
    """Both services inside this process, as the test harness runs them."""
    configure_logging("WARNING", "console")
    settings = Settings(database_url=stack.database_url, nats_url=stack.nats_url)
    ledger = await start_service(LEDGER, settings, grpc_port=0, serve_metrics_endpoint=False)
    try:
        target = f"127.0.0.1:{ledger.grpc_port}"
        reservation = await start_service(
            RESERVATION,
            settings.model_copy(update={"ledger_target": target}),
            grpc_port=0,
            serve_metrics_endpoint=False,
        )
        try:

            async def metrics() -> str:
                return generate_latest(REGISTRY).decode()

            yield Endpoints(target, f"127.0.0.1:{reservation.grpc_port}", metrics)
        finally:
            await reservation.stop()
    finally:
        await ledger.stop()


def parse_metrics(text: str) -> Metrics:
    """Every sample of a Prometheus text exposition, summed over identical series."""
    samples: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def metric_delta(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    """How much every series of ``name`` matching ``labels`` grew between two snapshots."""
    wanted = set(labels.items())

    def total(samples: Metrics) -> float:
        return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= set(lbl))

    return total(after) - total(before)


def mean_of(before: Metrics, after: Metrics, histogram: str, **labels: str) -> float:
    """The mean of a histogram's observations between two snapshots (NaN if none)."""
    count = metric_delta(before, after, f"{histogram}_count", **labels)
    summed = metric_delta(before, after, f"{histogram}_sum", **labels)
    return summed / count if count else math.nan


class Shop:
    """The benchmark's master data, stock and channel, built through the public APIs."""

    def __init__(
        self,
        ledger: ledger_grpc.StockLedgerServiceAsyncStub,
        reservations: pb_grpc.ReservationServiceAsyncStub,
        spread: int,
    ) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.ledger = ledger
        self.reservations = reservations
        self.channel = f"web-{tag}"
        self.locations = [f"store-{tag}-{i}" for i in range(2)]
        self.location = self.locations[0]
        self.spread = [f"SKU-{tag}-{i}" for i in range(spread)]
        self.hot = f"SKU-{tag}-hot"
        self.watched = f"SKU-{tag}-watch"
        self.device = f"bench-{tag}"
        self.sequence = 0

    @property
    def skus(self) -> list[str]:
        """Every SKU of the benchmark."""
        return [*self.spread, self.hot, self.watched]

    async def open(self) -> None:
        """Create locations and SKUs, the channel, and stock the reservation service sees."""
        await self.ledger.UpsertLocations(
            ledger_pb.UpsertLocationsRequest(
                request_id=f"locations-{self.tag}",
                locations=[
                    ledger_res.Location(
                        location_id=loc, kind=types_pb2.LOCATION_KIND_STORE, name=loc,
                        position=types_pb2.GeoPoint(latitude=52.09, longitude=5.12),
                    )
                    for loc in self.locations
                ],
            ),
            timeout=CALL_TIMEOUT,
        )  # fmt: skip
        await self.ledger.UpsertSkus(
            ledger_pb.UpsertSkusRequest(
                request_id=f"skus-{self.tag}",
                skus=[ledger_res.Sku(sku=s, product_id=f"P-{self.tag}", name=s) for s in self.skus],
            ),
            timeout=CALL_TIMEOUT,
        )
        rules = res.ChannelRules(
            channel=self.channel, location_ids=self.locations, cart_ttl=Duration(seconds=3600)
        )
        # Refused (unknown location) until the ledger's events reach the service.
        await eventually(
            lambda: self.reservations.SetChannelRules(
                pb.SetChannelRulesRequest(request_id=f"rules-{self.tag}", rules=rules),
                timeout=CALL_TIMEOUT,
            )
        )
        await eventually(lambda: self.figures(self.skus))  # SKUs arrive by event too
        await self.post([self.receipt(sku, STOCK) for sku in self.skus])

        async def stocked() -> None:
            found = await self.figures(self.skus)
            if any(figure.on_hand != STOCK for figure in found):
                raise LookupError(f"{sum(f.on_hand != STOCK for f in found)} SKUs not stocked")

        await eventually(stocked)

    def receipt(self, sku: str, quantity: int) -> ledger_res.MovementInput:
        """A receipt of sellable goods at the benchmark's store, with the next scanner key."""
        self.sequence += 1
        return ledger_res.MovementInput(
            key=ledger_res.IdempotencyKey(device_id=self.device, sequence=self.sequence),
            sku=sku,
            location_id=self.location,
            receipt=ledger_res.Receipt(quantity=quantity),
        )

    async def post(
        self, movements: Sequence[ledger_res.MovementInput]
    ) -> ledger_pb.PostMovementsResponse:
        """Post movements to the ledger."""
        response: ledger_pb.PostMovementsResponse = await self.ledger.PostMovements(
            ledger_pb.PostMovementsRequest(movements=movements), timeout=CALL_TIMEOUT
        )
        return response

    async def figures(self, skus: Sequence[str]) -> list[res.Availability]:
        """The channel's figure at the benchmark's store for each of ``skus``."""
        response = await self.reservations.GetAvailability(
            pb.GetAvailabilityRequest(
                channel=self.channel, skus=skus, location_ids=[self.location]
            ),
            timeout=CALL_TIMEOUT,
        )
        return [sku.locations[0] for sku in response.availability]

    def reserve(self, sku_of: Callable[[int], str], placed: Counter[str]) -> Operation:
        """An operation holding 1 unit (an order hold) of ``sku_of(worker)``."""

        async def operation(worker: int, n: int) -> None:
            sku = sku_of(worker)
            await self.reservations.Reserve(
                pb.ReserveRequest(
                    request_id=uuid.uuid4().hex,
                    channel=self.channel,
                    reference=f"order-{self.tag}-{worker}-{n}",
                    kind=res.RESERVATION_KIND_ORDER,
                    lines=[pb.ReserveLine(sku=sku, location_id=self.location, quantity=1)],
                ),
                timeout=CALL_TIMEOUT,
            )
            placed[sku] += 1

        return operation


# What a call answers while the ledger's events have not reached the service yet.
NOT_YET = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


async def eventually(probe: Callable[[], Awaitable[object]]) -> None:
    """Call ``probe`` until it stops raising (the service learns master data by events)."""
    deadline = time.monotonic() + WAIT_WITHIN
    while True:
        try:
            await probe()
            return
        except grpc.aio.AioRpcError as error:
            if error.code() not in NOT_YET:
                raise  # a real failure: waiting will not help
            last: Exception = error
        except LookupError as error:
            last = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready within {WAIT_WITHIN} s: {last}") from last
        await asyncio.sleep(0.05)


async def outbox_backlog(pool: asyncpg.Pool[asyncpg.Record], schema: str) -> int:
    """Events committed to ``schema``'s outbox and not yet published."""
    count: int = await pool.fetchval(
        f"SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL"
    )
    return count


async def drain_outbox(pool: asyncpg.Pool[asyncpg.Record], within: float = 30.0) -> float:
    """Wait until both services published every event; returns the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < within:
        backlog = await outbox_backlog(pool, "reservation") + await outbox_backlog(pool, "ledger")
        if backlog == 0:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def load_figures(
    endpoints: Endpoints, channel: grpc.aio.Channel, shop: Shop,
    pool: asyncpg.Pool[asyncpg.Record], clients: Sequence[int], seconds: float, warm_up: float,
    placed: Counter[str],
) -> tuple[list[Figure], dict[str, str]]:  # fmt: skip
    """Every concurrency: no-op gRPC, raw hot-row UPDATE, Reserve on distinct and on one SKU.

    The no-op calls and the Reserve calls share ``channel``, the shop's channel.
    """
    figures: list[Figure] = []
    notes: dict[str, str] = {}
    check = health_check(channel)

    async def noop(worker: int, n: int) -> None:
        await check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)

    async def raw(worker: int, n: int) -> None:
        status = await pool.execute(HOT_ROW_UPDATE, 1)
        if status != "UPDATE 1":
            raise RuntimeError(f"the hot row ran out: {status}")

    distinct = shop.reserve(lambda worker: shop.spread[worker], placed)
    hot = shop.reserve(lambda worker: shop.hot, placed)
    for count in clients:
        cases: list[tuple[str, Operation, str]] = [
            (f"no-op gRPC (health Check), {count:>2} clients", noop, "Check"),
            (f"raw hot-row UPDATE, {count:>2} clients", raw, ""),
            (f"Reserve, distinct SKUs, {count:>2} clients", distinct, "Reserve"),
            (f"Reserve, one hot SKU, {count:>2} clients", hot, "Reserve"),
        ]
        for name, operation, rpc in cases:
            await measure_for("warm-up", count, warm_up, operation)
            before = await snapshot(endpoints, pool)
            figure = await measure_for(name, count, seconds, operation)
            after = await snapshot(endpoints, pool)
            figures.append(figure)
            notes[name] = await case_notes(pool, before, after, rpc, figure)
            print(f"  measured {name}: {figure.units_per_second:,.0f}/s", flush=True)
    return figures, notes


@dataclass(frozen=True)
class Snapshot:
    """The services' metrics and the reservation outbox's size at one moment."""

    metrics: Metrics
    outbox_events: int  # events ever written to the reservation outbox (its highest id)


async def snapshot(endpoints: Endpoints, pool: asyncpg.Pool[asyncpg.Record]) -> Snapshot:
    """Read the services' metrics and the reservation outbox's highest id."""
    top: int = await pool.fetchval("SELECT coalesce(max(id), 0) FROM reservation.outbox")
    return Snapshot(parse_metrics(await endpoints.metrics()), top)


async def case_notes(
    pool: asyncpg.Pool[asyncpg.Record], start: Snapshot, end: Snapshot, rpc: str, figure: Figure
) -> str:
    """The service-side view of a scenario, from its metrics and its outbox."""
    if not rpc:
        return ""
    before, after = start.metrics, end.metrics
    server = mean_of(before, after, "grpc_server_handling_seconds", grpc_method=rpc) * 1000
    parts = [f"server {server:.2f} ms"]
    if rpc == "Reserve":
        batches = metric_delta(
            before, after, "omni_group_commit_batch_size_count", committer=COMMITTER
        )
        batch = mean_of(before, after, "omni_group_commit_batch_size", committer=COMMITTER)
        txn = mean_of(before, after, "omni_group_commit_batch_seconds", committer=COMMITTER) * 1000
        queued = mean_of(before, after, "omni_group_commit_queue_seconds", committer=COMMITTER)
        written = (end.outbox_events - start.outbox_events) / figure.seconds
        relayed = (
            metric_delta(before, after, "omni_outbox_published_total", service="reservation")
            / figure.seconds
        )
        backlog = await outbox_backlog(pool, "reservation")
        drained = await drain_outbox(pool)
        parts += [
            f"batch {batch:.1f} x {batches / figure.seconds:.0f}/s",
            f"txn {txn:.1f} ms",
            f"queued {queued * 1000:.1f} ms",
            f"outbox {written:,.0f} events/s in, {relayed:,.0f}/s out, "
            f"{backlog:,} left (drained in {drained:.1f} s)",
        ]
    for error, times in figure.errors.items():
        parts.append(f"{times} x {error}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Propagation:
    """Latencies of availability changes reaching a WatchAvailability stream."""

    from_recorded: Figure
    from_response: Figure
    missed: int


async def propagation(endpoints: Endpoints, shop: Shop, samples: int) -> Propagation:
    """Receipt after receipt of the watched SKU; each time, wait for its figure on the stream."""
    arrivals: asyncio.Queue[tuple[float, float, res.Availability]] = asyncio.Queue()
    from_recorded: list[float] = []
    from_response: list[float] = []
    missed = 0
    async with bench_channel(endpoints.reservation) as channel:
        stub: pb_grpc.ReservationServiceAsyncStub = pb_grpc.ReservationServiceStub(channel)
        call = stub.WatchAvailability(
            pb.WatchAvailabilityRequest(
                channel=shop.channel, skus=[shop.watched], location_ids=[shop.location]
            )
        )

        async def read() -> None:
            async for message in call:
                perf, wall = time.perf_counter(), time.time()
                for figure in message.figures:
                    arrivals.put_nowait((perf, wall, figure))

        reader = asyncio.create_task(read())
        try:
            await asyncio.wait_for(arrivals.get(), WAIT_WITHIN)  # the snapshot: subscribed
            warm_up = 10
            started = time.perf_counter()
            for number in range(warm_up + samples):
                await asyncio.sleep(random.uniform(0.0, 0.01))  # no lockstep with any poll
                response = await shop.post([shop.receipt(shop.watched, 1)])
                responded = time.perf_counter()
                movement = response.results[0].movement
                recorded = movement.recorded_at.ToMicroseconds() / 1e6
                on_hand = max(
                    p.on_hand_after for p in movement.postings if p.stock.sku == shop.watched
                )
                arrival = await matching(arrivals, shop.location, on_hand, reader)
                if arrival is None:
                    missed += 1
                elif number >= warm_up:
                    from_recorded.append(arrival[1] - recorded)
                    from_response.append(arrival[0] - responded)
            elapsed = time.perf_counter() - started
        finally:
            call.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return Propagation(
        Figure("ledger recorded_at -> watch stream", samples, samples, elapsed,
               tuple(from_recorded)),
        Figure("PostMovements response -> watch stream", samples, samples, elapsed,
               tuple(from_response)),
        missed,
    )  # fmt: skip


async def matching(
    arrivals: asyncio.Queue[tuple[float, float, res.Availability]],
    location: str,
    on_hand: int,
    reader: asyncio.Task[None],
    within: float = 5.0,
) -> tuple[float, float, res.Availability] | None:
    """The first arrival of the location's figure showing ``on_hand``; None if none in time."""
    deadline = time.perf_counter() + within
    while (left := deadline - time.perf_counter()) > 0:
        if reader.done() and arrivals.empty():
            error = reader.exception()
            raise RuntimeError(f"the watch stream ended: {error and describe_error(error)}")
        try:
            arrival = await asyncio.wait_for(arrivals.get(), min(left, 0.5))
        except TimeoutError:
            continue
        figure = arrival[2]
        if figure.location_id == location and figure.on_hand >= on_hand:
            return arrival
    return None


async def nats_figures(url: str, samples: int) -> list[Figure]:
    """Core NATS publish -> receive, and one acknowledged JetStream publish, one at a time."""
    subject = f"bench.rtt.{uuid.uuid4().hex[:6]}"
    payload = b"x" * 600  # about an AvailabilityChanged envelope
    received: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        received.put_nowait(time.perf_counter())

    async with AsyncExitStack() as stack:
        publisher = await nats.connect(url)
        stack.push_async_callback(publisher.close)
        listener = await nats.connect(url)
        stack.push_async_callback(listener.close)
        await listener.subscribe(subject, cb=on_message)
        await listener.flush()
        core: list[float] = []
        for number in range(10 + samples):
            began = time.perf_counter()
            await publisher.publish(subject, payload)
            arrived = await asyncio.wait_for(received.get(), 5.0)
            if number >= 10:
                core.append(arrived - began)

        js = publisher.jetstream()
        stream = f"BENCH_{uuid.uuid4().hex[:6].upper()}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject}.js"]))
        stack.push_async_callback(js.delete_stream, stream)
        acked: list[float] = []
        for number in range(10 + samples):
            began = time.perf_counter()
            await js.publish(f"{subject}.js", payload)
            if number >= 10:
                acked.append(time.perf_counter() - began)
    return [
        Figure("core NATS publish -> receive", samples, samples, sum(core), tuple(core)),
        Figure("JetStream publish -> ack (sync always)", samples, samples, sum(acked),
               tuple(acked)),
    ]  # fmt: skip


@dataclass(frozen=True)
class Results:
    """Everything one run measured."""

    load: list[Figure]
    notes: dict[str, str]
    propagation: Propagation
    nats: list[Figure]
    consistency: list[str]
    service_notes: list[str]


async def run(
    clients: Sequence[int], seconds: float, warm_up: float, samples: int, in_process: bool
) -> Results:
    """Start the stack and both services, measure everything, stop it all."""
    async with bench_stack() as stack:
        start = services_in_process if in_process else service_processes
        async with start(stack) as endpoints:
            results = await scenarios(stack, endpoints, clients, seconds, warm_up, samples)
    return results


async def scenarios(
    stack: EmbeddedStack, endpoints: Endpoints, clients: Sequence[int],
    seconds: float, warm_up: float, samples: int,
) -> Results:  # fmt: skip
    """Build the shop, then the load cases, propagation, NATS baselines and a consistency check."""
    async with (
        bench_channel(endpoints.ledger) as ledger_channel,
        bench_channel(endpoints.reservation) as reservation_channel,
    ):
        ledger: ledger_grpc.StockLedgerServiceAsyncStub = ledger_grpc.StockLedgerServiceStub(
            ledger_channel
        )
        reservations: pb_grpc.ReservationServiceAsyncStub = pb_grpc.ReservationServiceStub(
            reservation_channel
        )
        shop = Shop(ledger, reservations, max(clients))
        await shop.open()
        print(f"  stocked {len(shop.skus)} SKUs with {STOCK:,} units each", flush=True)
        pool = await asyncpg.create_pool(
            stack.database_url, min_size=max(clients), max_size=max(clients)
        )
        try:
            await pool.execute(SCRATCH)
            placed: Counter[str] = Counter()
            load, notes = await load_figures(
                endpoints, reservation_channel, shop, pool, clients, seconds, warm_up, placed
            )
            await drain_outbox(pool)
            before = parse_metrics(await endpoints.metrics())
            watched = await propagation(endpoints, shop, samples)
            after = parse_metrics(await endpoints.metrics())
            print("  measured propagation", flush=True)
            consistency = await check_holds(shop, placed)
        finally:
            await pool.close()

    def ms(histogram: str, **labels: str) -> str:
        return f"{mean_of(before, after, histogram, **labels) * 1000:.2f} ms"

    service_notes = [
        "service metrics during the propagation samples (means):",
        "  outbox commit -> JetStream ack: ledger "
        f"{ms('omni_outbox_publish_lag_seconds', service='ledger')}, reservation "
        f"{ms('omni_outbox_publish_lag_seconds', service='reservation')}",
        "  reservation's ledger consumer, handling one StockMoved: "
        f"{ms('omni_consumer_handling_seconds', consumer='reservation-ledger')}",
        "  movement recorded -> availability committed in reservation: "
        f"{ms('omni_reservation_movement_to_availability_seconds')}",
    ]
    return Results(
        load, notes, watched, await nats_figures(stack.nats_url, samples), consistency,
        service_notes,
    )  # fmt: skip


async def check_holds(shop: Shop, placed: Counter[str]) -> list[str]:
    """Compare the units the service reports reserved with the Reserve calls that succeeded."""
    wrong = []
    skus = [sku for sku in [*shop.spread, shop.hot] if placed[sku]]
    for figure in await shop.figures(skus):
        if figure.reserved != placed[figure.sku]:
            wrong.append(f"{figure.sku}: reserved {figure.reserved}, calls ok {placed[figure.sku]}")
    if not wrong:
        wrong.append(f"OK: reserved units match {sum(placed.values()):,} successful Reserve calls")
    return wrong


def report(results: Results, clients: Sequence[int]) -> None:
    """Print the figures, the propagation, the consistency check and the aims."""
    figures = results.load
    by_name = {f.name: f for f in figures}
    baselines = {}
    for count in clients:
        noop = f"no-op gRPC (health Check), {count:>2} clients"
        raw = f"raw hot-row UPDATE, {count:>2} clients"
        baselines[f"Reserve, distinct SKUs, {count:>2} clients"] = noop
        baselines[f"Reserve, one hot SKU, {count:>2} clients"] = raw
    print_latency_table(
        "Reserve of 1 unit vs baselines, closed loop, each case "
        f"{figures[0].seconds:.0f} s after a warm-up",
        figures,
        "calls",
        baselines,
        results.notes,
    )
    print(
        "  notes: server = mean handling time in the reservation server; batch = mean holds per\n"
        "  group-commit transaction x transactions/s; txn = mean transaction; queued = mean wait\n"
        "  for a batch; outbox = reservation events written and published per second, and the\n"
        "  unpublished ones left when the load stopped."
    )

    watched = results.propagation
    print(f"\nAvailability propagation ({len(watched.from_recorded.latencies)} samples, "
          f"{watched.missed} missed within 5 s; ms)")  # fmt: skip
    print(f"  {'path':<44} {'p50':>8} {'p99':>8} {'max':>8}")
    for figure in [watched.from_recorded, watched.from_response, *results.nats]:
        worst = max(figure.latencies, default=math.nan) * 1000
        print(f"  {figure.name:<44} {figure.latency_ms(0.5):>8.2f} {figure.latency_ms(0.99):>8.2f}"
              f" {worst:>8.2f}")  # fmt: skip
    for line in results.service_notes:
        print(f"  {line}")
    print("\nConsistency")
    for line in results.consistency:
        print(f"  {line}")

    high = max(clients)
    mid = 16 if 16 in clients else sorted(clients)[len(clients) // 2]

    def rate(kind: str, count: int) -> float:
        return by_name[f"{kind}, {count:>2} clients"].units_per_second

    def p99(kind: str, count: int) -> float:
        return by_name[f"{kind}, {count:>2} clients"].latency_ms(0.99)

    distinct, hot = "Reserve, distinct SKUs", "Reserve, one hot SKU"
    noop, raw = "no-op gRPC (health Check)", "raw hot-row UPDATE"
    h, m = f"at {high}", f"at {mid}"
    aims: list[tuple[str, float, str, float]] = [
        (f"hot / distinct SKU rate {h}", ratio(rate(hot, high), rate(distinct, high)), ">=", 0.9),
        (
            f"hot SKU / raw hot-row UPDATE rate {h}",
            ratio(rate(hot, high), rate(raw, high)),
            ">=",
            1.0,
        ),
        (
            f"Reserve (distinct) / no-op rate {m}",
            ratio(rate(distinct, mid), rate(noop, mid)),
            ">=",
            0.3,
        ),
        (f"Reserve (hot) / no-op rate {m}", ratio(rate(hot, mid), rate(noop, mid)), ">=", 0.3),
        (
            f"Reserve (distinct) p99 / no-op p99 {m}",
            ratio(p99(distinct, mid), p99(noop, mid)),
            "<=",
            4.0,
        ),
        (f"Reserve (hot) p99 / no-op p99 {m}", ratio(p99(hot, mid), p99(noop, mid)), "<=", 4.0),
        (
            "propagation p99 from recorded_at (ms)",
            watched.from_recorded.latency_ms(0.99),
            "<",
            50.0,
        ),
    ]
    print("\nAims (reported, not enforced)")
    for label, value, relation, target in aims:
        met = {">=": value >= target, "<=": value <= target, "<": value < target}[relation]
        print(f"  {label:<46} {value:>8.2f}  aim {relation} {target:<5}  "
              f"{'PASS' if met else 'MISS'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,16,64", help="concurrencies, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case")
    parser.add_argument("--warm-up", type=float, default=1.0, help="unmeasured seconds per case")
    parser.add_argument("--samples", type=int, default=200, help="propagation samples")
    parser.add_argument("--in-process", action="store_true",
                        help="run both services inside the benchmark's process")  # fmt: skip
    args = parser.parse_args()
    clients = sorted({int(c) for c in args.clients.split(",")})
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = asyncio.run(run(clients, args.seconds, args.warm_up, args.samples, args.in_process))
    report(results, clients)
    where = "in this process" if args.in_process else "in their own processes"
    print(
        f"\n  ran {time.perf_counter() - started:.0f} s; services {where}; {os.cpu_count()} CPUs;"
        f" 1-minute load average before the run {load_before:.1f} (if well above 0, something"
        " else was using the CPUs)"
    )


if __name__ == "__main__":
    main()
