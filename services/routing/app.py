"""Wiring of the routing service for the shared runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from omnistock.grpc.server import ServiceBinding
from omnistock.migrations import MigrationSet
from omnistock.service import ServiceContext, ServiceSpec, Worker
from omnistock.sweeper import Sweeper
from services.routing import grpc_api
from services.routing.consumers import fulfilment_consumer, ledger_consumer, reservation_consumer
from services.routing.handlers import RoutingHandlers

MIGRATIONS = MigrationSet("routing", Path(__file__).parent / "migrations")
WORK_BATCH = 20
GAUGE_INTERVAL_SECONDS = 30.0


class ClientChannels:
    """Closes the channels to the other services when the service stops."""

    name = "routing-client-channels"

    def __init__(self, handlers: RoutingHandlers) -> None:
        self._handlers = handlers
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Wait for the stop, then close."""
        await self._stopped.wait()
        await self._handlers.close()

    def stop(self) -> None:
        """Ask :meth:`run` to close the channels and return."""
        self._stopped.set()


def _build(context: ServiceContext) -> tuple[Sequence[ServiceBinding], Sequence[Worker]]:
    settings = context.settings
    handlers = RoutingHandlers(
        context.pool,
        reservation_target=settings.grpc_target("reservation"),
        ledger_target=settings.grpc_target("ledger"),
        channels=context.channels,
    )

    async def refresh_gauges() -> int:
        await handlers.refresh_gauges()
        return 0

    workers: list[Worker] = [
        ledger_consumer(context, handlers),
        fulfilment_consumer(context, handlers),
        reservation_consumer(context, handlers),
        Sweeper(
            "routing-reroute",
            lambda: handlers.work_due(WORK_BATCH),
            interval=settings.routing_work_interval_seconds,
            batch_size=WORK_BATCH,
        ),
        Sweeper("routing-gauges", refresh_gauges, interval=GAUGE_INTERVAL_SECONDS, batch_size=1),
        ClientChannels(handlers),
    ]
    return [grpc_api.binding(handlers)], workers


SPEC = ServiceSpec(name="routing", migrations=MIGRATIONS, build=_build)
