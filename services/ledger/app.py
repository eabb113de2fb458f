"""Wiring of the stock ledger service for the shared runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnistock.grpc.server import ServiceBinding
from omnistock.migrations import MigrationSet
from omnistock.service import ServiceContext, ServiceSpec, Worker
from services.ledger import grpc_api
from services.ledger.consumers import fulfilment_consumer, returns_consumer
from services.ledger.handlers import LedgerHandlers

MIGRATIONS = MigrationSet("ledger", Path(__file__).parent / "migrations")


def _build(context: ServiceContext) -> tuple[Sequence[ServiceBinding], Sequence[Worker]]:
    handlers = LedgerHandlers(context.pool)
    workers = [returns_consumer(context, handlers), fulfilment_consumer(context, handlers)]
    return [grpc_api.binding(handlers)], workers


SPEC = ServiceSpec(name="ledger", migrations=MIGRATIONS, build=_build)
