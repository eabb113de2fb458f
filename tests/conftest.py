"""Test harness: a real PostgreSQL and a real nats-server (JetStream) on free ports.

Both start once per test session in a temporary folder, get the streams
provisioned and every migration applied, exactly as ``omni dev run`` prepares
them. Services verify tokens against one development key made for the session
(:func:`harness_auth`); tests that are not about authentication call them with
its ``service`` token through :func:`client_channels`. Tests never depend on
fixed ports or on each other's data: each one makes its own SKUs and locations
with fresh ids.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omnistock.auth.dev import DevAuth
from omnistock.db import Pool, create_pool
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.grpc.client import ChannelFactory
from omnistock.logs import configure_logging
from omnistock.nats_client import connect
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from services.ledger.app import SPEC as LEDGER
from services.registry import prepare_all


@functools.cache
def harness_auth() -> DevAuth:
    """The session's signing key, JWKS and service token (one place for every harness:
    the in-process services, the process stacks, and the tests' clients)."""
    folder = Path(tempfile.mkdtemp(prefix="omnistock-auth-"))
    atexit.register(shutil.rmtree, folder, True)
    return DevAuth.ensure(folder)


def client_channels(settings: Settings) -> ChannelFactory:
    """Channels as the harness's clients open them: the service token, TLS as configured."""
    return ChannelFactory.from_settings(settings)


@contextmanager
def throwaway_servers(prefix: str) -> Iterator[EmbeddedStack]:
    """An embedded PostgreSQL (fsync off) and nats-server in a folder of their own.

    Not under pytest's temporary root: another pytest session on the machine
    prunes old folders there and takes away the access the embedded PostgreSQL
    (an unprivileged user when run as root) needs to its data.
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        servers = EmbeddedStack(
            state_dir=Path(folder),
            postgres_port=free_port(),
            nats_port=free_port(),
            nats_monitor_port=free_port(),
            durable=False,
        )
        servers.start()
        try:
            yield servers
        finally:
            servers.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator[EmbeddedStack]:
    """PostgreSQL and nats-server for the whole session, prepared like ``omni dev run``."""
    configure_logging("WARNING", "console")
    with throwaway_servers("omnistock-tests-") as servers:
        asyncio.run(prepare_all(servers.database_url, servers.nats_url))
        yield servers


@pytest.fixture(scope="session")
def settings(stack: EmbeddedStack) -> Settings:
    """Settings pointing at the harness's servers, with a short outbox poll, verifying
    tokens with the session's key and calling other services with its service token."""
    auth = harness_auth()
    return Settings(
        database_url=stack.database_url,
        nats_url=stack.nats_url,
        auth_jwks_file=auth.jwks_file,
        service_token_file=auth.service_token_file,
        outbox_poll_interval_seconds=0.2,
        grpc_shutdown_grace_seconds=2.0,
    )


@pytest.fixture(scope="session")
async def pool(settings: Settings) -> AsyncIterator[Pool]:
    """A connection pool for assertions straight against the database."""
    created = await create_pool(settings.require_database_url(), min_size=1, max_size=5)
    yield created
    await created.close()


@pytest.fixture(scope="session")
async def nats_client(settings: Settings) -> AsyncIterator[Client]:
    """A NATS connection for reading what landed on JetStream."""
    client = await connect(settings.require_nats_url(), name="omnistock-tests")
    yield client
    await client.close()


@pytest.fixture(scope="session")
def js(nats_client: Client) -> JetStreamContext:
    """The JetStream context of the test connection."""
    return nats_client.jetstream()


@pytest.fixture(scope="session")
async def ledger_service(settings: Settings) -> AsyncIterator[RunningService]:
    """The stock ledger service, running in-process on a free port."""
    service = await start_service(LEDGER, settings, grpc_port=0, serve_metrics_endpoint=False)
    yield service
    await service.stop()


@pytest.fixture(scope="session")
def channels(settings: Settings) -> ChannelFactory:
    """Opens channels to the services with the ``service`` token."""
    return client_channels(settings)


@pytest.fixture(scope="session")
async def ledger_channel(
    ledger_service: RunningService, channels: ChannelFactory
) -> AsyncIterator[grpc.aio.Channel]:
    """A real gRPC channel to the ledger."""
    async with channels.open(f"127.0.0.1:{ledger_service.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def ledger(ledger_channel: grpc.aio.Channel) -> ledger_grpc.StockLedgerServiceAsyncStub:
    """A typed stub of the ledger."""
    stub: ledger_grpc.StockLedgerServiceAsyncStub = ledger_grpc.StockLedgerServiceStub(
        ledger_channel
    )
    return stub


# The async stub types exist only in the generated typing stubs.
LedgerStub: TypeAlias = "ledger_grpc.StockLedgerServiceAsyncStub"
ReservationStub: TypeAlias = "reservation_grpc.ReservationServiceAsyncStub"


class Network:
    """Fresh master data for one test: SKUs and locations nobody else uses."""

    def __init__(self, ledger: ledger_grpc.StockLedgerServiceAsyncStub) -> None:
        self.ledger = ledger
        self.tag = uuid.uuid4().hex[:10]
        self.device = f"scanner-{self.tag}"
        self._sequence = 0
        self._made = 0  # ids handed out, so a second call makes new ones

    def next_key(self, device: str | None = None) -> resources_pb2.IdempotencyKey:
        """The next idempotency key of this test's scanner."""
        self._sequence += 1
        return resources_pb2.IdempotencyKey(
            device_id=device or self.device, sequence=self._sequence
        )

    def _next_numbers(self, count: int) -> range:
        start = self._made
        self._made += count
        return range(start, start + count)

    async def locations(self, count: int = 2) -> list[str]:
        """Create ``count`` stores and return their ids."""
        ids = [f"loc-{self.tag}-{i}" for i in self._next_numbers(count)]
        await self.ledger.UpsertLocations(
            ledger_pb.UpsertLocationsRequest(
                request_id=f"locations-{self.tag}-{count}-{uuid.uuid4().hex[:6]}",
                locations=[
                    resources_pb2.Location(
                        location_id=location_id,
                        kind=types_pb2.LOCATION_KIND_STORE,
                        name=f"Test store {location_id}",
                        city="Utrecht",
                        position=types_pb2.GeoPoint(latitude=52.09, longitude=5.12),
                    )
                    for location_id in ids
                ],
            )
        )
        return ids

    async def skus(self, count: int = 1) -> list[str]:
        """Create ``count`` SKUs and return their ids."""
        ids = [f"SKU-{self.tag}-{i}" for i in self._next_numbers(count)]
        await self.ledger.UpsertSkus(
            ledger_pb.UpsertSkusRequest(
                request_id=f"skus-{self.tag}-{count}-{uuid.uuid4().hex[:6]}",
                skus=[
                    resources_pb2.Sku(sku=sku, product_id=f"P-{self.tag}", name=f"Test {sku}")
                    for sku in ids
                ],
            )
        )
        return ids


@pytest.fixture
def network(ledger: ledger_grpc.StockLedgerServiceAsyncStub) -> Network:
    """Fresh ids and master data helpers for one test."""
    return Network(ledger)


async def fresh_database(stack: EmbeddedStack) -> str:
    """A new, fully migrated database on the harness's server; returns its DSN."""
    name = f"omni_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(stack.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = stack.database_url.rsplit("/", 1)[0] + f"/{name}"
    await prepare_all(dsn, stack.nats_url)
    return dsn


@pytest.fixture
async def isolated_dsn(stack: EmbeddedStack) -> str:
    """A database of its own, for tests that tamper with data or count globally."""
    return await fresh_database(stack)
