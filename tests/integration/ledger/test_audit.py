"""The ledger audit proves the ledger balances, and catches tampering."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest

from services.ledger import domain
from services.ledger.audit import audit
from services.ledger.handlers import LedgerHandlers


async def seeded(dsn: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    await pool.execute(
        "INSERT INTO ledger.locations (location_id, kind, name, latitude, longitude) VALUES "
        "('store-a', 'store', 'A', 52.1, 5.1), ('store-b', 'store', 'B', 52.2, 5.2)"
    )
    await pool.execute(
        "INSERT INTO ledger.skus (sku, product_id, name) VALUES ('SKU-1', 'P', 'One'), "
        "('SKU-2', 'P', 'Two')"
    )
    key = iter(range(1, 100))

    def move(sku: str, location: str, detail: domain.MovementDetail) -> domain.PostMovement:
        return domain.PostMovement(domain.IdempotencyKey("audit", next(key)), sku, location, detail)

    await LedgerHandlers(pool).post_movements(
        [
            move("SKU-1", "store-a", domain.Receipt(20)),
            move("SKU-2", "store-a", domain.Receipt(5)),
            move("SKU-1", "store-a", domain.TransferOut("TR-1", "store-b", 7)),
            move("SKU-1", "store-b", domain.TransferIn("TR-1", 7)),
            move("SKU-1", "store-b", domain.StateChange(2, domain.StockState.SELLABLE,
                                                      domain.StockState.DAMAGED)),
            move("SKU-2", "store-a", domain.CycleCount(3)),
            move("SKU-1", "store-a", domain.Shipment(4)),
        ]
    )  # fmt: skip
    return pool


def run_audit_command(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", "audit"],
        env={**os.environ, "OMNI_DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_the_audit_passes_on_a_clean_ledger(isolated_dsn: str) -> None:
    pool = await seeded(isolated_dsn)
    async with pool.acquire() as conn:
        report = await audit(conn)
    await pool.close()
    command = run_audit_command(isolated_dsn)

    assert report.ok, report.findings
    assert report.postings_checked == 10  # transfers and the state change post twice
    assert command.returncode == 0, command.stdout + command.stderr
    assert "ledger balances" in command.stdout


async def test_the_audit_catches_a_tampered_balance(isolated_dsn: str) -> None:
    pool = await seeded(isolated_dsn)
    await pool.execute(
        "UPDATE ledger.balances SET on_hand = on_hand + 5 "
        "WHERE sku = 'SKU-2' AND location_id = 'store-a' AND state = 'sellable'"
    )
    async with pool.acquire() as conn:
        report = await audit(conn)
    await pool.close()
    command = run_audit_command(isolated_dsn)

    assert [(f.check, f.sku, f.location_id, f.state) for f in report.findings] == [
        ("sum", "SKU-2", "store-a", "sellable")
    ]
    assert "balance says 8, postings sum to 3" in str(report.findings[0])
    assert command.returncode == 1
    assert "MISMATCH [sum] SKU-2@store-a/sellable" in command.stdout


async def test_the_audit_catches_a_posting_changed_behind_the_triggers(isolated_dsn: str) -> None:
    pool = await seeded(isolated_dsn)
    async with pool.acquire() as conn, conn.transaction():
        # A superuser can switch triggers off; the audit must still notice.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE ledger.postings SET quantity_delta = quantity_delta + 1 "
            "WHERE sku = 'SKU-1' AND location_id = 'store-b' AND state = 'damaged'"
        )
    async with pool.acquire() as conn:
        report = await audit(conn)
    await pool.close()

    checks = {(f.check, f.sku, f.location_id, f.state) for f in report.findings}
    assert ("sum", "SKU-1", "store-b", "damaged") in checks
    assert ("running-balance", "SKU-1", "store-b", "damaged") in checks


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger.postings SET quantity_delta = 0",
        "DELETE FROM ledger.postings",
        "UPDATE ledger.movements SET kind = 'receipt'",
        "DELETE FROM ledger.movements",
        "TRUNCATE ledger.postings CASCADE",
    ],
)
async def test_movements_and_postings_are_append_only(isolated_dsn: str, statement: str) -> None:
    pool = await seeded(isolated_dsn)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="append-only"):
            await pool.execute(statement)
        assert await pool.fetchval("SELECT count(*) FROM ledger.postings") == 10
    finally:
        await pool.close()


async def test_the_audit_catches_units_created_by_editing_a_transfer_consistently(
    isolated_dsn: str,
) -> None:
    """Sum and running balance still agree, but the transfer no longer nets to zero."""
    pool = await seeded(isolated_dsn)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE ledger.postings p SET quantity_delta = quantity_delta + 2, "
            "on_hand_after = on_hand_after + 2 FROM ledger.movements m "
            "WHERE p.movement_id = m.movement_id AND m.kind = 'transfer_out' "
            "AND p.location_id = 'store-a'"
        )
        # Later postings of the same stock are shifted too, so the chain still holds.
        await conn.execute(
            "UPDATE ledger.postings SET on_hand_after = on_hand_after + 2 "
            "WHERE sku = 'SKU-1' AND location_id = 'store-a' AND state = 'sellable' "
            "AND balance_version > 2"
        )
        await conn.execute(
            "UPDATE ledger.balances SET on_hand = on_hand + 2 "
            "WHERE sku = 'SKU-1' AND location_id = 'store-a' AND state = 'sellable'"
        )
    async with pool.acquire() as conn:
        report = await audit(conn)
    await pool.close()

    assert {f.check for f in report.findings} == {"movement"}
    assert "transfer_out" in str(report.findings[0])
    assert "netting 2" in str(report.findings[0])


async def test_the_audit_catches_a_transfer_line_that_disagrees_with_stock_in_transit(
    isolated_dsn: str,
) -> None:
    pool = await seeded(isolated_dsn)
    await pool.execute(
        "INSERT INTO ledger.transfers (transfer_id, sku, source_location_id, "
        "destination_location_id, quantity_sent, quantity_received) "
        "VALUES ('TR-GHOST', 'SKU-2', 'store-a', 'store-b', 4, 0)"
    )
    async with pool.acquire() as conn:
        report = await audit(conn)
    await pool.close()

    assert [(f.check, f.sku, f.location_id) for f in report.findings] == [
        ("in-transit", "SKU-2", "store-b")
    ]
    assert "0 in transit but open transfers sent 4" in str(report.findings[0])
