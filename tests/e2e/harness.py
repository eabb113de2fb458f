"""The end-to-end process harness: every service as its own OS process, as in production.

A :class:`ProcessStack` runs ``python -m services.<name>`` for the four services
against one PostgreSQL database and one nats-server, each service on free gRPC
and metrics ports given through ``OMNI_*`` variables, with short timings for
tests. It waits until every service answers its health check, hands out typed
stubs, SIGKILLs and restarts a service or nats-server itself, and keeps each
process's output in a log file that a failing test shows. With ``replicas=2``
(or more) it runs that many processes of every service, each on its own
ports, sharing the database, the streams and the durable consumers, as a
scaled-out deployment does.

The checkers prove, after a scenario, what must hold whatever happened:

- :func:`audit_problems` — the ledger audit passes;
- :func:`hold_problems` — no order hold is active that routing's order does
  not stand for (and every allocation routing counts as held is held), no cart
  hold outlived its time to live;
- :func:`availability_problems` — every channel's availability per (SKU,
  location) equals the ledger's on-hand - held - safety stock, and the network
  figure is the sum of the location figures.

The system converges asynchronously, so :func:`assert_consistent` polls the
three until they all pass (or fails naming what is wrong), and
:func:`eventually` waits for any other effect.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias, TypeVar

import asyncpg
import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2

from omni.common.v1 import types_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as fulfilment_grpc
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omni.routing.v1 import routing_service_pb2_grpc as routing_grpc
from omnistock.db import Pool, create_pool
from omnistock.devstack.nats import EmbeddedNats
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.grpc.health import health_check
from omnistock.messaging.dead_letters import DLQ_STREAM, DeadLetter, read_dead_letters
from omnistock.nats_client import connect
from omnistock.settings import ServiceName, Settings
from services.ledger.audit import audit
from services.registry import REPO_ROOT, prepare_all
from tests.conftest import client_channels, harness_auth

LedgerStub: TypeAlias = "ledger_grpc.StockLedgerServiceAsyncStub"
ReservationStub: TypeAlias = "reservation_grpc.ReservationServiceAsyncStub"
RoutingStub: TypeAlias = "routing_grpc.OrderRoutingServiceAsyncStub"
FulfilmentStub: TypeAlias = "fulfilment_grpc.FulfilmentServiceAsyncStub"
# What the ``start_process_stack`` fixture is: OMNI_* overrides -> a stack to use in ``async with``.
StackStarter: TypeAlias = (
    "Callable[[Mapping[str, object]], AbstractAsyncContextManager[ProcessStack]]"
)

T = TypeVar("T")

SERVICES: tuple[ServiceName, ...] = ("ledger", "reservation", "routing", "fulfilment")

# Short timings so a scenario converges in well under a second per hop. A test
# that needs another value passes it as an override (see ``ProcessStack``).
TEST_ENV: dict[str, str] = {
    "OMNI_OUTBOX_POLL_INTERVAL_SECONDS": "0.1",
    "OMNI_RESERVATION_SWEEP_INTERVAL_SECONDS": "0.2",
    "OMNI_FULFILMENT_SWEEP_INTERVAL_SECONDS": "0.2",
    "OMNI_ROUTING_WORK_INTERVAL_SECONDS": "0.1",
    # Long enough that a shipment's posting and its hold's consumption, which
    # travel on different streams, never look like shrinkage on a busy machine.
    "OMNI_RESERVATION_SHORT_GRACE_SECONDS": "5",
    "OMNI_GRPC_SHUTDOWN_GRACE_SECONDS": "2",
    "OMNI_DB_POOL_MIN_SIZE": "1",
    "OMNI_DB_POOL_MAX_SIZE": "5",
    "OMNI_LOG_LEVEL": "INFO",
    "OMNI_LOG_FORMAT": "console",
}

# Reconnect quickly after a service restarts instead of gRPC's default back-off
# (which grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# What a probe may meet while the system converges: a service restarting, master
# data not yet announced to a service, an order not yet kept.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

_ACTIVE: list[ProcessStack] = []


def active_stacks() -> list[ProcessStack]:
    """The process stacks running now (their logs go with a failing test's report)."""
    return list(_ACTIVE)


# -- waiting ---------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    within: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
    retry_on: Collection[grpc.StatusCode] = TRANSIENT_CODES,
) -> T:
    """Call ``probe`` until ``accept`` takes its result; fail naming the last one seen.

    RPC errors with a code in ``retry_on`` count as "not yet"; any other error
    fails at once.
    """
    deadline = time.monotonic() + within
    last: object = "nothing (the probe never answered)"
    while True:
        try:
            result = await probe()
        except grpc.aio.AioRpcError as error:
            if error.code() not in retry_on:
                raise
            last = f"{error.code().name}: {error.details()}"
        else:
            if accept(result):
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {within} s; last seen: {last!r}")
        await asyncio.sleep(interval)


# -- the processes ---------------------------------------------------------------------


@dataclass
class ServiceRun:
    """One service's process, its ports and its log file."""

    name: ServiceName
    grpc_port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    replica: int = 0  # 0 is the service's first process, the one ``services`` names

    @property
    def running(self) -> bool:
        """The process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    @property
    def address(self) -> str:
        """Where the service answers gRPC."""
        return f"127.0.0.1:{self.grpc_port}"


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class ProcessStack:
    """The four services as separate processes against one database and one nats-server.

    ``overrides`` are ``OMNI_*`` variables on top of :data:`TEST_ENV`, for a
    test that needs, say, a short pickup window. The stack owns its processes;
    it owns the nats-server only when ``owns_nats`` (then :meth:`stop` stops it).

    ``replicas`` runs that many processes of every service. ``services`` names
    the first of each (what :meth:`kill`, :meth:`restart` and the stubs such as
    :attr:`ledger` use); :meth:`replicas_of` lists all of them, and
    :meth:`ledger_replica` and its siblings give a stub of any one. Replica
    ``k`` of routing and of the reservation service call replica ``k`` of the
    services they depend on, so calls spread over every process.
    """

    def __init__(
        self,
        *,
        database_url: str,
        nats: EmbeddedNats,
        log_dir: Path,
        overrides: Mapping[str, str] | None = None,
        owns_nats: bool = False,
        replicas: int = 1,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be 1 or more, got {replicas}")
        self.database_url = database_url
        self.nats = nats
        self.owns_nats = owns_nats
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[ServiceName, ServiceRun] = {
            name: ServiceRun(name, free_port(), free_port(), log_dir / f"{name}.log")
            for name in SERVICES
        }
        # The second and further process of each service.
        self.extra_replicas: dict[ServiceName, list[ServiceRun]] = {
            name: [
                ServiceRun(name, free_port(), free_port(), log_dir / f"{name}-{k}.log", replica=k)
                for k in range(1, replicas)
            ]
            for name in SERVICES
        }
        self.overrides = dict(overrides or {})
        self._channels: dict[ServiceName, grpc.aio.Channel] = {}
        self._replica_channels: dict[tuple[ServiceName, int], grpc.aio.Channel] = {}
        self._pool: Pool | None = None
        self._nats_killed = False

    # -- configuration ---------------------------------------------------------------

    @property
    def nats_url(self) -> str:
        """The URL of the stack's nats-server."""
        return self.nats.url

    @property
    def env(self) -> dict[str, str]:
        """The environment of every service process (and of CLI commands run against
        the stack): the test timings, every service's ports, the servers' addresses.

        Inherited ``OMNI_*`` variables are dropped, so a developer's configuration
        never points a test at real servers.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("OMNI_")}
        env.update(TEST_ENV)
        env["PYTHONUNBUFFERED"] = "1"  # a SIGKILLed process leaves its last lines
        env["OMNI_DATABASE_URL"] = self.database_url
        env["OMNI_NATS_URL"] = self.nats_url
        env["OMNI_GRPC_HOST"] = "127.0.0.1"
        env["OMNI_METRICS_HOST"] = "127.0.0.1"
        env.update(harness_auth().env())
        for run in self.services.values():
            prefix = f"OMNI_{run.name.upper()}"
            env[f"{prefix}_GRPC_PORT"] = str(run.grpc_port)
            env[f"{prefix}_METRICS_PORT"] = str(run.metrics_port)
        env.update(self.overrides)
        return env

    def env_of(self, run: ServiceRun) -> dict[str, str]:
        """The environment of one process: :attr:`env`, with a further replica's own
        ports and, as targets, the same replica of the services it calls."""
        env = self.env
        if run.replica == 0:
            return env
        prefix = f"OMNI_{run.name.upper()}"
        env[f"{prefix}_GRPC_PORT"] = str(run.grpc_port)
        env[f"{prefix}_METRICS_PORT"] = str(run.metrics_port)
        for callee in ("ledger", "reservation"):
            variable = f"OMNI_{callee.upper()}_TARGET"
            if variable not in self.overrides:
                env[variable] = self.replicas_of(callee)[run.replica].address
        return env

    def replicas_of(self, name: ServiceName) -> list[ServiceRun]:
        """Every process of a service, the first one first."""
        return [self.services[name], *self.extra_replicas[name]]

    @property
    def runs(self) -> list[ServiceRun]:
        """Every process of every service."""
        return [run for name in SERVICES for run in self.replicas_of(name)]

    @property
    def settings(self) -> Settings:
        """Settings a client of the stack reads (``grpc_target`` finds every service).

        Every address is given explicitly: values given win over ``OMNI_*``
        variables of the environment the tests run in.
        """
        values: dict[str, object] = {
            "database_url": self.database_url,
            "nats_url": self.nats_url,
            "grpc_host": "127.0.0.1",
            "metrics_host": "127.0.0.1",
            "ledger_target": self.services["ledger"].address,
            "reservation_target": self.services["reservation"].address,
            "auth_jwks_file": harness_auth().jwks_file,
            "service_token_file": harness_auth().service_token_file,
        }
        for run in self.services.values():
            values[f"{run.name}_grpc_port"] = run.grpc_port
            values[f"{run.name}_metrics_port"] = run.metrics_port
        return Settings.model_validate(values)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, within: float = 60.0) -> None:
        """Start every service and wait until each one serves."""
        _ACTIVE.append(self)
        for run in self.runs:
            self._spawn_run(run)
        await self.wait_serving(within=within)

    def _spawn(self, name: ServiceName) -> None:
        self._spawn_run(self.services[name])

    def _spawn_run(self, run: ServiceRun) -> None:
        name = run.name
        run.starts += 1
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        with run.log_path.open("ab") as log:
            log.write(f"\n===== {name} start #{run.starts} at {stamp} =====\n".encode())
            log.flush()
            run.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=self.env_of(run),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_serving(self, *names: ServiceName, within: float = 60.0) -> None:
        """Wait until the named services (every process of every service by default)
        report SERVING."""
        runs = [self.services[name] for name in names] if names else self.runs
        await asyncio.gather(*(self._wait_run(run, within) for run in runs))

    async def _wait_run(self, run: ServiceRun, within: float) -> None:
        name = run.name if run.replica == 0 else f"{run.name} replica {run.replica}"
        deadline = time.monotonic() + within
        async with client_channels(self.settings).open(run.address) as channel:
            check = health_check(channel)
            while True:
                if not run.running:
                    code = run.process.returncode if run.process else None
                    raise RuntimeError(
                        f"{name} is not running (exit code {code}); its log ends:\n"
                        + _tail(run.log_path, 40)
                    )
                try:
                    reply = await check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{name} did not serve within {within} s; its log ends:\n"
                        + _tail(run.log_path, 40)
                    )
                await asyncio.sleep(0.1)

    async def kill(self, name: ServiceName) -> None:
        """SIGKILL a service, as a crash or an OOM kill would: no shutdown at all."""
        run = self.services[name]
        if run.process is None or not run.running:
            raise RuntimeError(f"{name} is not running")
        run.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(run.process.wait)

    async def restart(self, name: ServiceName, within: float = 60.0) -> None:
        """Start a service again on the same ports (stopping it gracefully first if it
        still runs) and wait until it serves."""
        await self._terminate(name)
        self._spawn(name)
        await self.wait_serving(name, within=within)

    async def _terminate(self, name: ServiceName, grace: float = 20.0) -> None:
        await self._terminate_run(self.services[name], grace)

    async def _terminate_run(self, run: ServiceRun, grace: float = 20.0) -> None:
        process = run.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, grace)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def kill_nats(self) -> None:
        """SIGKILL the stack's nats-server (JetStream keeps what it acknowledged)."""
        await asyncio.to_thread(self.nats.kill)
        self._nats_killed = True

    async def restart_nats(self) -> None:
        """Start nats-server again on the same ports and JetStream folder."""
        await asyncio.to_thread(self.nats.start)
        self._nats_killed = False

    async def heal(self) -> None:
        """Bring back what a test killed and did not restart (nats-server, services), so
        one failing test does not take the next ones down with it."""
        if self._nats_killed:
            await self.restart_nats()
        dead = [name for name, run in self.services.items() if not run.running]
        for name in dead:
            self._spawn(name)
        if dead:
            await self.wait_serving(*dead)
        dead_replicas = [
            run for runs in self.extra_replicas.values() for run in runs if not run.running
        ]
        for run in dead_replicas:
            self._spawn_run(run)
        await asyncio.gather(*(self._wait_run(run, 60.0) for run in dead_replicas))

    async def stop(self) -> None:
        """Stop every service gracefully (SIGKILL after 20 s), then what the stack owns."""
        try:
            await asyncio.gather(*(self._terminate(name) for name in reversed(SERVICES)))
            await asyncio.gather(
                *(self._terminate_run(run) for runs in self.extra_replicas.values() for run in runs)
            )
            for channel in [*self._channels.values(), *self._replica_channels.values()]:
                await channel.close()
            self._channels.clear()
            self._replica_channels.clear()
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            if self.owns_nats:
                await asyncio.to_thread(self.nats.stop)
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    # -- clients ---------------------------------------------------------------------

    def channel(self, name: ServiceName) -> grpc.aio.Channel:
        """A long-lived channel to a service; it reconnects after a restart."""
        if name not in self._channels:
            self._channels[name] = client_channels(self.settings).open(
                self.services[name].address, options=CHANNEL_OPTIONS
            )
        return self._channels[name]

    def replica_channel(self, name: ServiceName, replica: int) -> grpc.aio.Channel:
        """A long-lived channel to one process of a service (0 is :meth:`channel`)."""
        if replica == 0:
            return self.channel(name)
        key = (name, replica)
        if key not in self._replica_channels:
            self._replica_channels[key] = client_channels(self.settings).open(
                self.replicas_of(name)[replica].address, options=CHANNEL_OPTIONS
            )
        return self._replica_channels[key]

    def ledger_replica(self, replica: int) -> LedgerStub:
        """A typed stub of one process of the stock ledger."""
        stub: LedgerStub = ledger_grpc.StockLedgerServiceStub(
            self.replica_channel("ledger", replica)
        )
        return stub

    def reservations_replica(self, replica: int) -> ReservationStub:
        """A typed stub of one process of the reservation service."""
        stub: ReservationStub = reservation_grpc.ReservationServiceStub(
            self.replica_channel("reservation", replica)
        )
        return stub

    def routing_replica(self, replica: int) -> RoutingStub:
        """A typed stub of one process of order routing."""
        stub: RoutingStub = routing_grpc.OrderRoutingServiceStub(
            self.replica_channel("routing", replica)
        )
        return stub

    def fulfilment_replica(self, replica: int) -> FulfilmentStub:
        """A typed stub of one process of the fulfilment service."""
        stub: FulfilmentStub = fulfilment_grpc.FulfilmentServiceStub(
            self.replica_channel("fulfilment", replica)
        )
        return stub

    @property
    def ledger(self) -> LedgerStub:
        """A typed stub of the stock ledger."""
        stub: LedgerStub = ledger_grpc.StockLedgerServiceStub(self.channel("ledger"))
        return stub

    @property
    def reservations(self) -> ReservationStub:
        """A typed stub of the reservation service."""
        stub: ReservationStub = reservation_grpc.ReservationServiceStub(self.channel("reservation"))
        return stub

    @property
    def routing(self) -> RoutingStub:
        """A typed stub of order routing."""
        stub: RoutingStub = routing_grpc.OrderRoutingServiceStub(self.channel("routing"))
        return stub

    @property
    def fulfilment(self) -> FulfilmentStub:
        """A typed stub of the fulfilment service."""
        stub: FulfilmentStub = fulfilment_grpc.FulfilmentServiceStub(self.channel("fulfilment"))
        return stub

    async def pool(self) -> Pool:
        """A small connection pool on the stack's database (for the checkers' reads)."""
        if self._pool is None:
            self._pool = await create_pool(self.database_url, min_size=1, max_size=3)
        return self._pool

    # -- diagnostics -----------------------------------------------------------------

    def log_tail(self, name: ServiceName, lines: int = 60) -> str:
        """The last lines a service's processes wrote."""
        return _tail(self.services[name].log_path, lines)

    def failure_sections(self, lines: int = 60) -> list[tuple[str, str]]:
        """(title, text) sections for a failing test's report: every process's log tail."""
        sections = []
        for run in self.runs:
            state = "running" if run.running else "NOT running"
            title = run.name if run.replica == 0 else f"{run.name} replica {run.replica}"
            sections.append((f"{title} ({state}, {run.log_path})", _tail(run.log_path, lines)))
        sections.append((f"nats-server ({self.nats.log_file})", _tail(self.nats.log_file, 20)))
        return sections


async def run_cli(stack: ProcessStack, *args: str, within: float = 60.0) -> tuple[int, str]:
    """Run ``omni <args>`` against the stack; returns the exit code and its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args,
        env=stack.env, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), within)
    return await process.wait(), output.decode()


# -- test data -------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A location of a test network."""

    name: str
    kind: str  # "store" or "dc"
    position: tuple[float, float]
    ship_from_store: bool = True
    click_and_collect: bool = True
    accepts_returns: bool = True
    daily_capacity: int = 0  # orders a day routing may give it; 0 is no limit


@dataclass
class ScenarioNetwork:
    """Fresh master data for one scenario, made through the public APIs: locations,
    SKUs and a channel selling from all of them, with ids nobody else uses."""

    stack: ProcessStack
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    skus: list[str] = field(default_factory=list)
    locations: dict[str, str] = field(default_factory=dict)  # name -> location id
    _sequence: int = 0

    @property
    def channel(self) -> str:
        """The scenario's own sales channel."""
        return f"web-{self.tag}"

    def id(self, name: str) -> str:
        """The location id of a place of this network."""
        return self.locations[name]

    def request_id(self, what: str) -> str:
        """A fresh request id."""
        return f"{what}-{self.tag}-{uuid.uuid4().hex[:8]}"

    def next_key(self) -> ledger_res.IdempotencyKey:
        """The next movement key of the scenario's scanner."""
        self._sequence += 1
        return ledger_res.IdempotencyKey(device_id=f"e2e-{self.tag}", sequence=self._sequence)

    async def build(self, places: Sequence[Place], skus: int = 1) -> ScenarioNetwork:
        """Create the places, ``skus`` SKUs and the channel's rules; wait until the
        reservation service and routing know them."""
        locations = []
        for place in places:
            location_id = f"{place.name}-{self.tag}"
            self.locations[place.name] = location_id
            store = place.kind == "store"
            locations.append(
                ledger_res.Location(
                    location_id=location_id,
                    kind=types_pb2.LOCATION_KIND_STORE
                    if store
                    else types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE,
                    name=f"{place.name.title()} {self.tag}",
                    city=place.name.title(),
                    position=types_pb2.GeoPoint(
                        latitude=place.position[0], longitude=place.position[1]
                    ),
                    capabilities=ledger_res.LocationCapabilities(
                        ship_from_store=place.ship_from_store,
                        click_and_collect=store and place.click_and_collect,
                        accepts_returns=place.accepts_returns,
                        daily_capacity=place.daily_capacity,
                    ),
                )
            )
        ledger = self.stack.ledger
        await ledger.UpsertLocations(
            ledger_pb.UpsertLocationsRequest(
                request_id=self.request_id("locations"), locations=locations
            )
        )
        self.skus = [f"SKU-{self.tag}-{n}" for n in range(skus)]
        await ledger.UpsertSkus(
            ledger_pb.UpsertSkusRequest(
                request_id=self.request_id("skus"),
                skus=[
                    ledger_res.Sku(sku=sku, product_id=f"P-{self.tag}", name=f"Test {sku}")
                    for sku in self.skus
                ],
            )
        )
        rules = reservation_res.ChannelRules(
            channel=self.channel,
            location_ids=list(self.locations.values()),
            cart_ttl=Duration(seconds=1200),
            low_stock_threshold=2,
        )
        request = reservation_pb.SetChannelRulesRequest(
            request_id=self.request_id("rules"), rules=rules
        )
        # The reservation service learns locations from the ledger's events.
        await eventually(
            lambda: self.stack.reservations.SetChannelRules(request),
            lambda _: True,
            what="the reservation service knows the locations",
        )
        await self.known_to_routing()
        return self

    async def known_to_routing(self) -> None:
        """Wait until routing has heard of every location (it plans over them)."""
        pool = await self.stack.pool()
        wanted = list(self.locations.values())

        async def known() -> int:
            count: int = await pool.fetchval(
                "SELECT count(*) FROM routing.locations WHERE location_id = ANY($1::text[])",
                wanted,
            )
            return count

        await eventually(known, lambda n: n == len(wanted), what="routing knows the locations")

    async def available(self, sku: str, name: str) -> int:
        """The channel's available-to-promise of ``sku`` at a place."""
        found = await self.stack.reservations.GetAvailability(
            reservation_pb.GetAvailabilityRequest(
                channel=self.channel, skus=[sku], location_ids=[self.id(name)]
            )
        )
        return found.availability[0].locations[0].available

    async def receive(self, sku: str, name: str, quantity: int) -> None:
        """Post a receipt at a place and wait until the channel can promise it."""
        before = await eventually(
            lambda: self.available(sku, name), lambda _: True, what=f"{sku} known"
        )
        await self.stack.ledger.PostMovements(
            ledger_pb.PostMovementsRequest(
                movements=[
                    ledger_res.MovementInput(
                        key=self.next_key(),
                        sku=sku,
                        location_id=self.id(name),
                        receipt=ledger_res.Receipt(quantity=quantity),
                    )
                ]
            )
        )
        await eventually(
            lambda: self.available(sku, name),
            lambda units: units == before + quantity,
            what=f"{quantity} received at {name} available",
        )

    def order(
        self,
        lines: Sequence[tuple[str, int]],
        *,
        to: tuple[float, float] | None = None,
        pickup: str | None = None,
        split: bool = True,
    ) -> routing_pb.RouteOrderRequest:
        """A RouteOrder request of the scenario's channel: home delivery ``to`` a
        position, or click-and-collect at the place ``pickup``."""
        request = routing_pb.RouteOrderRequest(
            request_id=self.request_id("route"),
            order_id=f"order-{self.tag}-{uuid.uuid4().hex[:8]}",
            channel=self.channel,
            delivery_method=(
                routing_res.DELIVERY_METHOD_CLICK_AND_COLLECT
                if pickup
                else routing_res.DELIVERY_METHOD_SHIP_TO_HOME
            ),
            lines=[routing_pb.OrderLineInput(sku=sku, quantity=q) for sku, q in lines],
            options=routing_res.RoutingOptions(allow_split=split),
        )
        if pickup:
            request.customer.pickup_location_id = self.id(pickup)
        elif to is not None:
            request.customer.position.latitude, request.customer.position.longitude = to
            request.customer.country = "NL"
        return request


async def order_of(stack: ProcessStack, order_id: str) -> routing_res.Order:
    """GetOrder."""
    found = await stack.routing.GetOrder(routing_pb.GetOrderRequest(order_id=order_id))
    return found.order


async def task_for(
    stack: ProcessStack, location_id: str, order_id: str, within: float = 20.0
) -> fulfilment_res.Fulfilment:
    """Wait for the open fulfilment task of ``order_id`` in ``location_id``'s queue."""

    async def find() -> fulfilment_res.Fulfilment | None:
        token = ""
        while True:
            page = await stack.fulfilment.ListFulfilments(
                fulfilment_pb.ListFulfilmentsRequest(
                    location_id=location_id, page_size=200, page_token=token
                )
            )
            for task in page.fulfilments:
                if task.order_id == order_id:
                    return task
            token = page.next_page_token
            if not token:
                return None

    found = await eventually(
        find,
        lambda task: task is not None,
        within=within,
        what=f"a task for {order_id} at {location_id}",
    )
    assert found is not None
    return found


async def ship_task(stack: ProcessStack, task: fulfilment_res.Fulfilment) -> None:
    """Work a ship-from-store (or DC) task as staff would: accept, pick all, pack, ship."""
    fulfilment = stack.fulfilment
    task_id = task.fulfilment_id

    def rid(step: str) -> str:
        return f"{step}-{task_id}"

    await fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(request_id=rid("accept"), fulfilment_id=task_id)
    )
    await fulfilment.ConfirmPick(
        fulfilment_pb.ConfirmPickRequest(
            request_id=rid("pick"),
            fulfilment_id=task_id,
            lines=[
                fulfilment_pb.PickedLine(sku=item.sku, picked_quantity=item.quantity)
                for item in task.items
            ],
        )
    )
    await fulfilment.PackFulfilment(
        fulfilment_pb.PackFulfilmentRequest(request_id=rid("pack"), fulfilment_id=task_id)
    )
    shipped = await fulfilment.ShipFulfilment(
        fulfilment_pb.ShipFulfilmentRequest(
            request_id=rid("ship"),
            fulfilment_id=task_id,
            carrier="postnl",
            tracking_number=f"3S{task_id[:8].upper()}",
        )
    )
    assert shipped.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_SHIPPED


# -- checkers --------------------------------------------------------------------------


async def audit_problems(stack: ProcessStack) -> list[str]:
    """The ledger audit's findings (none when the ledger balances)."""
    pool = await stack.pool()
    async with pool.acquire() as conn:
        report = await audit(conn)
    return [f"ledger audit: {finding}" for finding in report.findings]


async def _active_holds(
    stack: ProcessStack, channels: Collection[str] | None
) -> list[reservation_res.Reservation]:
    """Every active reservation: found in the reservation schema, read through the API
    (so a line's held units are what the service itself says)."""
    pool = await stack.pool()
    rows = await pool.fetch(
        "SELECT DISTINCT channel, reference FROM reservation.reservations "
        "WHERE status = 'active' ORDER BY 1, 2"
    )
    holds: list[reservation_res.Reservation] = []
    for row in rows:
        if channels is not None and row["channel"] not in channels:
            continue
        found = await stack.reservations.ListReservations(
            reservation_pb.ListReservationsRequest(
                channel=row["channel"],
                reference=row["reference"],
                statuses=[reservation_res.RESERVATION_STATUS_ACTIVE],
            )
        )
        holds.extend(found.reservations)
    return holds


def _held_lines(
    holds: Iterable[reservation_res.Reservation],
) -> list[tuple[reservation_res.Reservation, reservation_res.ReservationLine]]:
    return [
        (hold, line)
        for hold in holds
        for line in hold.lines
        if line.status == reservation_res.LINE_STATUS_ACTIVE and line.held_quantity > 0
    ]


_ORDER_STATUS = routing_res.OrderStatus.Name
_OPEN_ORDERS = ("routing", "routed", "needs_attention")
_ENDED_ORDERS = (routing_res.ORDER_STATUS_FULFILLED, routing_res.ORDER_STATUS_CANCELLED)


async def hold_problems(
    stack: ProcessStack, *, channels: Collection[str] | None = None, slack: float = 5.0
) -> list[str]:
    """Holds that should not be active, and allocations that should be held but are not.

    - An active order hold must belong to an order routing keeps, and that order
      must still stand for its units: a HELD allocation naming the reservation
      line (up to its units not yet fulfilled), or, at a pickup store, goods a
      transfer brought there and the customer has not collected yet.
    - Every HELD allocation of an open order must be backed by its active line.
    - An order still being routed is reported too: after a scenario every order
      has settled.
    - A cart hold must not be active more than ``slack`` seconds past its expiry.

    ``channels`` limits the check to those channels (for tests that place order
    holds without routing).
    """
    problems: list[str] = []
    holds = await _active_holds(stack, channels)
    now = datetime.now(UTC)
    by_order: dict[str, list[tuple[reservation_res.Reservation, reservation_res.ReservationLine]]]
    by_order = defaultdict(list)
    for hold, line in _held_lines(holds):
        if hold.kind == reservation_res.RESERVATION_KIND_CART:
            expires = hold.expires_at.ToDatetime(tzinfo=UTC)
            if expires + timedelta(seconds=slack) < now:
                problems.append(
                    f"cart hold {hold.reservation_id} ({hold.channel}/{hold.reference}) expired "
                    f"at {expires:%H:%M:%S} but still holds {line.held_quantity} x {line.sku} "
                    f"at {line.location_id}"
                )
        else:
            by_order[hold.reference].append((hold, line))

    pool = await stack.pool()
    open_orders = await pool.fetch(
        "SELECT order_id, channel FROM routing.orders WHERE status = ANY($1::text[])",
        list(_OPEN_ORDERS),
    )
    order_ids = set(by_order) | {
        row["order_id"] for row in open_orders if channels is None or row["channel"] in channels
    }
    for order_id in sorted(order_ids):
        try:
            order = await order_of(stack, order_id)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            for hold, line in by_order[order_id]:
                problems.append(
                    f"order hold {hold.reservation_id} line {line.line_number} holds "
                    f"{line.held_quantity} x {line.sku} at {line.location_id} for "
                    f"{order_id}, which routing does not know"
                )
            continue
        problems += _order_hold_problems(order, by_order[order_id])
    return problems


def _order_hold_problems(
    order: routing_res.Order,
    lines: Sequence[tuple[reservation_res.Reservation, reservation_res.ReservationLine]],
) -> list[str]:
    status = _ORDER_STATUS(order.status)
    problems: list[str] = []
    if order.status == routing_res.ORDER_STATUS_ROUTING:
        problems.append(f"order {order.order_id} is still being routed")
    # Units routing stands for per reservation line, and goods awaiting
    # collection per (sku, pickup store) that no allocation names.
    open_units: dict[tuple[str, int], int] = defaultdict(int)
    awaiting_collection: dict[tuple[str, str], int] = defaultdict(int)
    if order.status not in _ENDED_ORDERS:
        for a in order.allocations:
            if a.status == routing_res.ALLOCATION_STATUS_HELD:
                open_units[(a.reservation_id, a.reservation_line_number)] += (
                    a.quantity - a.fulfilled_quantity
                )
            elif (
                a.status == routing_res.ALLOCATION_STATUS_SHIPPED
                and a.type == routing_res.FULFILMENT_TYPE_TRANSFER_TO_STORE
            ):
                awaiting_collection[(a.sku, a.pickup_location_id)] += a.quantity
    held_per_line: dict[tuple[str, int], int] = {}
    for hold, line in lines:
        key = (hold.reservation_id, line.line_number)
        held_per_line[key] = line.held_quantity
        if key in open_units:
            if line.held_quantity > open_units[key]:
                problems.append(
                    f"order {order.order_id} ({status}): hold {hold.reservation_id} line "
                    f"{line.line_number} holds {line.held_quantity} x {line.sku} at "
                    f"{line.location_id}, but routing's open allocations on it want only "
                    f"{open_units[key]}"
                )
            continue
        arrived = (line.sku, line.location_id)
        if awaiting_collection[arrived] >= line.held_quantity:
            awaiting_collection[arrived] -= line.held_quantity
            continue
        problems.append(
            f"order {order.order_id} ({status}): hold {hold.reservation_id} line "
            f"{line.line_number} still holds {line.held_quantity} x {line.sku} at "
            f"{line.location_id}, but routing has no open allocation or awaited pickup for it "
            f"(allocations: {_describe_allocations(order)})"
        )
    if order.status == routing_res.ORDER_STATUS_ROUTING:
        return problems
    for (reservation_id, line_number), units in open_units.items():
        held = held_per_line.get((reservation_id, line_number), 0)
        if held < units:
            problems.append(
                f"order {order.order_id} ({status}): routing counts {units} unit(s) held by "
                f"reservation {reservation_id} line {line_number}, but only {held} are held"
            )
    return problems


def _describe_allocations(order: routing_res.Order) -> str:
    return "; ".join(
        f"{a.quantity} x {a.sku} at {a.location_id} "
        f"{routing_res.FulfilmentType.Name(a.type).removeprefix('FULFILMENT_TYPE_').lower()} "
        f"{routing_res.AllocationStatus.Name(a.status).removeprefix('ALLOCATION_STATUS_')}"
        for a in order.allocations
    )


async def availability_problems(
    stack: ProcessStack,
    *,
    skus: Collection[str] | None = None,
    channels: Collection[str] | None = None,
) -> list[str]:
    """Where a channel's availability differs from on-hand - held - safety stock.

    On-hand comes from the ledger (sellable stock levels), held from the active
    holds of every channel, safety stock from the rules (the location's plus the
    channel's). Per (sku, location) of every channel (or of ``channels``) and
    every SKU with stock (or ``skus``): on_hand, reserved, safety_stock,
    available and the low-stock flag must be what those sources say, and the
    network figure must be the sum over the channel's open locations.
    """
    ledger = stack.ledger
    locations = {
        loc.location_id: loc
        for loc in (await ledger.ListLocations(ledger_pb.ListLocationsRequest())).locations
    }
    if not locations:
        return []
    levels = await ledger.GetStockLevels(
        ledger_pb.GetStockLevelsRequest(
            skus=sorted(skus) if skus is not None else [],
            location_ids=[] if skus is not None else sorted(locations),
            states=[types_pb2.STOCK_STATE_SELLABLE],
            include_zero=True,
        )
    )
    on_hand: dict[tuple[str, str], int] = defaultdict(int)
    for level in levels.levels:
        on_hand[(level.stock.sku, level.stock.location_id)] += level.on_hand
    held: dict[tuple[str, str], int] = defaultdict(int)
    for _, line in _held_lines(await _active_holds(stack, None)):
        held[(line.sku, line.location_id)] += line.held_quantity
    wanted = sorted(
        set(skus) if skus is not None else {sku for sku, _ in on_hand.keys() | held.keys()}
    )
    if not wanted:
        return []
    rules = await stack.reservations.ListRules(reservation_pb.ListRulesRequest())
    location_safety = {s.location_id: s.safety_stock for s in rules.location_safety_stock}

    problems: list[str] = []
    for channel in rules.channels:
        if channels is not None and channel.channel not in channels:
            continue
        for start in range(0, len(wanted), 1000):
            batch = wanted[start : start + 1000]
            try:
                answer = await stack.reservations.GetAvailability(
                    reservation_pb.GetAvailabilityRequest(
                        channel=channel.channel, skus=batch, include_locations=True
                    )
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in TRANSIENT_CODES:
                    raise
                problems.append(
                    f"{channel.channel}: GetAvailability {error.code().name}: {error.details()}"
                )
                continue
            for sku_figures in answer.availability:
                problems += _figure_problems(
                    channel, sku_figures, locations, on_hand, held, location_safety
                )
    return problems


def _figure_problems(
    channel: reservation_res.ChannelRules,
    figures: reservation_res.SkuAvailability,
    locations: Mapping[str, ledger_res.Location],
    on_hand: Mapping[tuple[str, str], int],
    held: Mapping[tuple[str, str], int],
    location_safety: Mapping[str, int],
) -> list[str]:
    problems: list[str] = []
    sku = figures.sku
    network_available = 0
    for figure in figures.locations:
        loc = figure.location_id
        key = (sku, loc)
        safety = location_safety.get(loc, 0) + channel.safety_stock
        is_open = loc in locations and not locations[loc].closed
        expected_available = max(0, on_hand.get(key, 0) - held.get(key, 0) - safety)
        if not is_open:
            expected_available = 0
        network_available += expected_available
        expected = (on_hand.get(key, 0), held.get(key, 0), safety, expected_available)
        seen = (figure.on_hand, figure.reserved, figure.safety_stock, figure.available)
        if seen != expected:
            problems.append(
                f"{channel.channel}: {sku} at {loc}: reservation says on_hand/reserved/"
                f"safety/available = {seen}, ledger on-hand - held - safety gives {expected}"
            )
        low = 0 < figure.available <= channel.low_stock_threshold
        if figure.low_stock != low:
            problems.append(
                f"{channel.channel}: {sku} at {loc}: low_stock is {figure.low_stock} with "
                f"{figure.available} available and threshold {channel.low_stock_threshold}"
            )
    sellable = {loc for loc in channel.location_ids if loc in locations}
    listed = {figure.location_id for figure in figures.locations}
    if sellable - listed:
        problems.append(
            f"{channel.channel}: {sku}: no figure for {sorted(sellable - listed)}, "
            "which the channel sells from"
        )
    if figures.network.available != network_available:
        problems.append(
            f"{channel.channel}: {sku}: network figure says {figures.network.available} "
            f"available, the locations add up to {network_available}"
        )
    return problems


async def consistency_problems(
    stack: ProcessStack,
    *,
    skus: Collection[str] | None = None,
    channels: Collection[str] | None = None,
) -> list[str]:
    """Every checker's problems at once (empty when all pass)."""
    return [
        *await audit_problems(stack),
        *await hold_problems(stack, channels=channels),
        *await availability_problems(stack, skus=skus, channels=channels),
    ]


async def assert_consistent(
    stack: ProcessStack,
    *,
    within: float = 30.0,
    skus: Collection[str] | None = None,
    channels: Collection[str] | None = None,
) -> None:
    """Wait until the ledger audit, the holds and the availability figures all check out;
    fail listing what is still wrong after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        problems = await consistency_problems(stack, skus=skus, channels=channels)
        if not problems:
            return
        if time.monotonic() >= deadline:
            listed = "\n  ".join(problems[:40])
            more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
            raise AssertionError(
                f"the system is not consistent after {within} s:\n  {listed}{more}"
            )
        await asyncio.sleep(0.2)


async def dead_letters(stack: ProcessStack, *, last: int = 20) -> tuple[int, list[DeadLetter]]:
    """How many messages the stack's dead-letter stream holds, and the newest ``last``.

    A dead letter is an event a consumer gave up on after its retries.
    """
    client = await connect(stack.nats_url, name="omnistock-e2e-dlq")
    try:
        js = client.jetstream()
        info = await js.stream_info(DLQ_STREAM)
        count = info.state.messages
        letters = await read_dead_letters(js, last=last) if count else []
    finally:
        await client.close()
    return count, letters


async def consumer_failures(stack: ProcessStack) -> list[str]:
    """Every handler failure a service's consumers counted (retried, or dead-lettered)."""
    pool = await stack.pool()
    found: list[str] = []
    for schema in SERVICES:
        rows = await pool.fetch(
            f"SELECT consumer, event_id, failures, last_error FROM {schema}.consumer_failures "
            "ORDER BY updated_at"
        )
        found += [
            f"{row['consumer']} failed {row['failures']}x on event {row['event_id']}: "
            f"{row['last_error']}"
            for row in rows
        ]
    return found


async def fresh_database(admin_url: str) -> str:
    """Create an empty database on the server of ``admin_url``; returns its DSN."""
    name = f"omni_e2e_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def check_overrides(overrides: Mapping[str, object]) -> dict[str, str]:
    """``OMNI_*`` overrides as strings; a name no setting reads is an error, not a no-op."""
    known = {f"OMNI_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"no setting reads {unknown}; see libs/omnistock/settings.py")
    return {key: str(value) for key, value in overrides.items()}


@asynccontextmanager
async def open_process_stack(
    servers: EmbeddedStack,
    log_dir: Path,
    overrides: Mapping[str, object] | None = None,
    *,
    replicas: int = 1,
) -> AsyncIterator[ProcessStack]:
    """A process stack of its own: a fresh database on ``servers``' PostgreSQL and a
    nats-server of its own (streams cannot be shared between two sets of services),
    prepared like ``omni dev run`` prepares them, with ``overrides`` on the test
    timings and ``replicas`` processes of every service. Stopped, with its
    nats-server, on exit."""
    database_url = await fresh_database(servers.database_url)
    nats = EmbeddedNats(log_dir / "nats" / "jetstream", free_port(), free_port())
    await asyncio.to_thread(nats.start)
    stack = ProcessStack(
        database_url=database_url,
        nats=nats,
        log_dir=log_dir,
        overrides=check_overrides(overrides or {}),
        owns_nats=True,
        replicas=replicas,
    )
    try:
        await prepare_all(database_url, nats.url)
        await stack.start()
        yield stack
    finally:
        await stack.stop()
