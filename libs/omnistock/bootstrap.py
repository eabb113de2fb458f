"""Prepare PostgreSQL and NATS for the services: streams and schema migrations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnistock.messaging.streams import load_declarations, provision
from omnistock.migrations import MigrationSet, migrate
from omnistock.nats_client import connect


async def provision_streams(nats_url: str, streams_file: Path) -> None:
    """Create or update the declared JetStream streams."""
    client = await connect(nats_url, name="omnistock-provisioner")
    try:
        await provision(client.jetstream(), load_declarations(streams_file))
    finally:
        await client.close()


async def prepare(
    database_url: str, nats_url: str, streams_file: Path, migration_sets: Sequence[MigrationSet]
) -> None:
    """Streams first, then the given migrations, in order."""
    await provision_streams(nats_url, streams_file)
    await migrate(database_url, list(migration_sets))
