"""Wiring of the stock ledger service for the shared runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnistock.grpc.server import ServiceBinding
from omnistock.migrations import MigrationSet
from omnistock.service import ServiceContext, ServiceSpec, Worker
from services.ledger import grpc_api
from services.ledger.consumers import returns_consumer
from services.ledger.handlers import LedgerHandlers

MIGRATIONS = MigrationSet("ledger", Path(__file__).parent / "migrations")


def _build(context: ServiceContext) -> tuple[Sequence[ServiceBinding], Sequence[Worker]]:
    handlers = LedgerHandlers(context.pool)
    return [grpc_api.binding(handlers)], [returns_consumer(context, handlers)]


SPEC = ServiceSpec(name="ledger", migrations=MIGRATIONS, build=_build)
