"""Fixtures of the fulfilment tests: fulfilment beside real routing, reservation and ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
import pytest

from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as pb_grpc
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from services.fulfilment.app import SPEC as FULFILMENT
from tests.integration.routing.conftest import world

__all__ = ["world"]

FulfilmentStub: TypeAlias = "pb_grpc.FulfilmentServiceAsyncStub"


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
async def fulfilment(fulfilment_service: RunningService) -> AsyncIterator[FulfilmentStub]:
    """A typed stub of the fulfilment service on a real channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fulfilment_service.grpc_port}") as channel:
        stub: FulfilmentStub = pb_grpc.FulfilmentServiceStub(channel)
        yield stub
