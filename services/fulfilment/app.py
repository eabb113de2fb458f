"""Wiring of the fulfilment service for the shared runtime."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from omnistock.grpc.server import ServiceBinding
from omnistock.migrations import MigrationSet
from omnistock.service import ServiceContext, ServiceSpec, Worker
from omnistock.sweeper import Sweeper
from services.fulfilment import grpc_api
from services.fulfilment.consumers import routing_consumer
from services.fulfilment.handlers import FulfilmentHandlers

MIGRATIONS = MigrationSet("fulfilment", Path(__file__).parent / "migrations")
EXPIRY_BATCH = 100
GAUGE_INTERVAL_SECONDS = 15.0


def _build(context: ServiceContext) -> tuple[Sequence[ServiceBinding], Sequence[Worker]]:
    settings = context.settings
    handlers = FulfilmentHandlers(
        context.pool,
        accept_within=timedelta(seconds=settings.fulfilment_accept_within_seconds),
        pickup_window=timedelta(days=settings.fulfilment_pickup_window_days),
        code_secret=settings.fulfilment_code_secret.encode(),
    )

    async def refresh_gauges() -> int:
        await handlers.refresh_gauges()
        return 0

    workers: list[Worker] = [
        routing_consumer(context, handlers),
        Sweeper(
            "fulfilment-expiry",
            lambda: handlers.expire_due(EXPIRY_BATCH),
            interval=settings.fulfilment_sweep_interval_seconds,
            batch_size=EXPIRY_BATCH,
        ),
        Sweeper("fulfilment-gauges", refresh_gauges, interval=GAUGE_INTERVAL_SECONDS, batch_size=1),
    ]
    return [grpc_api.binding(handlers)], workers


SPEC = ServiceSpec(name="fulfilment", migrations=MIGRATIONS, build=_build)
