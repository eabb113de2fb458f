"""Wiring of the reservation service for the shared runtime."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from omnistock.grpc.server import ServiceBinding
from omnistock.migrations import MigrationSet
from omnistock.service import ServiceContext, ServiceSpec, Worker
from omnistock.sweeper import Sweeper
from services.reservation import grpc_api
from services.reservation.consumers import AvailabilityFeed, fulfilment_consumer, ledger_consumer
from services.reservation.handlers import ReservationHandlers
from services.reservation.watch import AvailabilityHub

MIGRATIONS = MigrationSet("reservation", Path(__file__).parent / "migrations")
EXPIRY_BATCH = 200
SHORTAGE_BATCH = 100
GAUGE_INTERVAL_SECONDS = 30.0


def _build(context: ServiceContext) -> tuple[Sequence[ServiceBinding], Sequence[Worker]]:
    settings = context.settings
    handlers = ReservationHandlers(
        context.pool,
        ledger_target=settings.grpc_target("ledger"),
        channels=context.channels,
        short_grace=timedelta(seconds=settings.reservation_short_grace_seconds),
        max_batch=settings.reservation_batch_max,
        batch_concurrency=settings.reservation_batch_concurrency,
    )
    hub = AvailabilityHub(max_lag=settings.watch_max_lag_seconds)

    async def refresh_gauges() -> int:
        await handlers.refresh_gauges()
        return 0

    interval = settings.reservation_sweep_interval_seconds
    workers: list[Worker] = [
        handlers.committer,
        ledger_consumer(context, handlers),
        fulfilment_consumer(context, handlers),
        AvailabilityFeed(context.nats, hub, lag_check_interval=settings.watch_max_lag_seconds / 4),
        Sweeper(
            "reservation-expiry",
            lambda: handlers.expire_due(EXPIRY_BATCH),
            interval=interval,
            batch_size=EXPIRY_BATCH,
        ),
        Sweeper(
            "reservation-shortage",
            lambda: handlers.flag_overdue_shortages(SHORTAGE_BATCH),
            interval=interval,
            batch_size=SHORTAGE_BATCH,
        ),
        Sweeper(
            "reservation-gauges", refresh_gauges, interval=GAUGE_INTERVAL_SECONDS, batch_size=1
        ),
    ]
    return [grpc_api.binding(handlers, hub)], workers


SPEC = ServiceSpec(name="reservation", migrations=MIGRATIONS, build=_build)
