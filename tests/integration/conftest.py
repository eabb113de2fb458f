"""Services shared by the integration tests of several contexts.

The reservation service runs in-process on a free port beside the ledger
(session-scoped, started once); ``eventually`` waits for asynchronous effects
the way a real client would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias, TypeVar

import grpc
import pytest

from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as fulfilment_grpc
from omni.reservation.v1 import reservation_service_pb2_grpc as pb_grpc
from omni.routing.v1 import routing_service_pb2_grpc as routing_grpc
from omnistock.grpc.client import ChannelFactory
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from services.fulfilment.app import SPEC as FULFILMENT
from services.reservation.app import SPEC as RESERVATION
from services.routing.app import SPEC as ROUTING
from tests.conftest import ReservationStub

RoutingStub: TypeAlias = "routing_grpc.OrderRoutingServiceAsyncStub"
FulfilmentStub: TypeAlias = "fulfilment_grpc.FulfilmentServiceAsyncStub"

T = TypeVar("T")


def reservation_settings(settings: Settings, ledger: RunningService) -> Settings:
    """Settings for a reservation replica in the tests: quick sweeps, short grace."""
    return settings.model_copy(
        update={
            "ledger_target": f"127.0.0.1:{ledger.grpc_port}",
            "reservation_sweep_interval_seconds": 0.2,
            "reservation_short_grace_seconds": 1.0,
            "watch_max_lag_seconds": 2.0,
        }
    )


@pytest.fixture(scope="session")
async def reservation_service(
    settings: Settings, ledger_service: RunningService
) -> AsyncIterator[RunningService]:
    """The reservation service, running in-process on a free port."""
    service = await start_service(
        RESERVATION,
        reservation_settings(settings, ledger_service),
        grpc_port=0,
        serve_metrics_endpoint=False,
    )
    yield service
    await service.stop()


@pytest.fixture(scope="session")
async def reservation_channel(
    reservation_service: RunningService, channels: ChannelFactory
) -> AsyncIterator[grpc.aio.Channel]:
    """A real gRPC channel to the reservation service."""
    address = f"127.0.0.1:{reservation_service.grpc_port}"
    async with channels.open(address) as channel:
        yield channel


@pytest.fixture(scope="session")
def reservations(reservation_channel: grpc.aio.Channel) -> ReservationStub:
    """A typed stub of the reservation service."""
    stub: ReservationStub = pb_grpc.ReservationServiceStub(reservation_channel)
    return stub


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], within: float = 15.0
) -> T:
    """Call ``probe`` until its result is accepted; fails with the last result seen."""
    deadline = time.monotonic() + within
    last: T | None = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except grpc.aio.AioRpcError as error:
            if error.code() not in (
                grpc.StatusCode.INVALID_ARGUMENT,  # the ledger's master data not here yet
                grpc.StatusCode.NOT_FOUND,
            ):
                raise
        else:
            if accept(last):
                return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within} s; last result: {last!r}")


def routing_settings(
    settings: Settings, ledger: RunningService, reservation: RunningService
) -> Settings:
    """Settings for a routing replica in the tests: a quick routing worker."""
    return settings.model_copy(
        update={
            "ledger_target": f"127.0.0.1:{ledger.grpc_port}",
            "reservation_target": f"127.0.0.1:{reservation.grpc_port}",
            "routing_work_interval_seconds": 0.1,
        }
    )


@pytest.fixture(scope="session")
async def routing_service(
    settings: Settings, ledger_service: RunningService, reservation_service: RunningService
) -> AsyncIterator[RunningService]:
    """The routing service, running in-process on a free port."""
    service = await start_service(
        ROUTING,
        routing_settings(settings, ledger_service, reservation_service),
        grpc_port=0,
        serve_metrics_endpoint=False,
    )
    yield service
    await service.stop()


@pytest.fixture(scope="session")
async def routing(
    routing_service: RunningService, channels: ChannelFactory
) -> AsyncIterator[RoutingStub]:
    """A typed stub of the routing service on a real channel."""
    async with channels.open(f"127.0.0.1:{routing_service.grpc_port}") as channel:
        stub: RoutingStub = routing_grpc.OrderRoutingServiceStub(channel)
        yield stub


@pytest.fixture(scope="session")
async def fulfilment_service(
    settings: Settings, routing_service: RunningService
) -> AsyncIterator[RunningService]:
    """The fulfilment service, in-process, with quick sweeps and a short accept window."""
    service = await start_service(
        FULFILMENT,
        settings.model_copy(
            update={
                "fulfilment_sweep_interval_seconds": 0.2,
                "fulfilment_accept_within_seconds": 600.0,
            }
        ),
        grpc_port=0,
        serve_metrics_endpoint=False,
    )
    yield service
    await service.stop()


@pytest.fixture(scope="session")
async def fulfilment(
    fulfilment_service: RunningService, channels: ChannelFactory
) -> AsyncIterator[FulfilmentStub]:
    """A typed stub of the fulfilment service on a real channel."""
    async with channels.open(f"127.0.0.1:{fulfilment_service.grpc_port}") as channel:
        stub: FulfilmentStub = fulfilment_grpc.FulfilmentServiceStub(channel)
        yield stub
