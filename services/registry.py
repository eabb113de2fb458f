"""Every Omnistock service, for the tools that run or prepare all of them."""

from __future__ import annotations

from pathlib import Path

from omnistock.bootstrap import prepare
from omnistock.migrations import MigrationSet, runtime_migrations
from omnistock.service import ServiceSpec
from services.fulfilment.app import SPEC as FULFILMENT
from services.ledger.app import SPEC as LEDGER
from services.reservation.app import SPEC as RESERVATION
from services.routing.app import SPEC as ROUTING

SERVICES: list[ServiceSpec] = [LEDGER, RESERVATION, ROUTING, FULFILMENT]
REPO_ROOT = Path(__file__).resolve().parents[1]
STREAMS_FILE = REPO_ROOT / "deploy" / "nats" / "streams.yaml"


def all_migrations() -> list[MigrationSet]:
    """The runtime's migrations, then every service's, in the order they apply."""
    return [runtime_migrations(), *(service.migrations for service in SERVICES)]


async def prepare_all(database_url: str, nats_url: str) -> None:
    """Provision the declared streams and apply every migration (dev stack, tests, jobs)."""
    await prepare(database_url, nats_url, STREAMS_FILE, all_migrations())
