"""SQL of the fulfilment service (schema ``fulfilment``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import asyncpg

from omnistock.db import Connection
from services.fulfilment.domain import Fulfilment, Item, Kind, Status


async def insert(conn: Connection, tasks: Sequence[Fulfilment]) -> list[Fulfilment]:
    """Keep new tasks; ones already kept (same order, plan, location, kind) are skipped."""
    kept: list[Fulfilment] = []
    for f in tasks:
        row = await conn.fetchrow(
            """
            INSERT INTO fulfilment.fulfilments (fulfilment_id, order_id, plan_number, channel,
                location_id, kind, pickup_location_id, status, accept_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (order_id, plan_number, location_id, kind) DO NOTHING
            RETURNING created_at, updated_at
            """,
            uuid.UUID(f.fulfilment_id),
            f.order_id,
            f.plan_number,
            f.channel,
            f.location_id,
            f.kind.value,
            f.pickup_location_id,
            f.status.value,
            f.accept_by,
        )
        if row is None:
            continue
        await conn.executemany(
            "INSERT INTO fulfilment.fulfilment_items (fulfilment_id, line_number, sku, quantity) "
            "VALUES ($1, $2, $3, $4)",
            [(uuid.UUID(f.fulfilment_id), i.line_number, i.sku, i.quantity) for i in f.items],
        )
        kept.append(_stamped(f, row["created_at"], row["updated_at"]))
    return kept


def _stamped(f: Fulfilment, created_at: datetime, updated_at: datetime) -> Fulfilment:
    return replace(f, created_at=created_at, updated_at=updated_at)


async def load(conn: Connection, fulfilment_id: str, *, lock: bool = False) -> Fulfilment | None:
    """One task with its items (row-locked when ``lock``)."""
    row = await conn.fetchrow(
        "SELECT * FROM fulfilment.fulfilments WHERE fulfilment_id = $1"
        + (" FOR UPDATE" if lock else ""),
        uuid.UUID(fulfilment_id),
    )
    if row is None:
        return None
    return (await _with_items(conn, [row]))[0]


async def _with_items(conn: Connection, rows: Sequence[asyncpg.Record]) -> list[Fulfilment]:
    ids = [r["fulfilment_id"] for r in rows]
    items: dict[uuid.UUID, list[Item]] = {i: [] for i in ids}
    for r in await conn.fetch(
        "SELECT * FROM fulfilment.fulfilment_items WHERE fulfilment_id = ANY($1::uuid[]) "
        "ORDER BY line_number, sku",
        ids,
    ):
        items[r["fulfilment_id"]].append(
            Item(r["line_number"], r["sku"], r["quantity"], r["picked_quantity"])
        )
    return [_fulfilment(r, items[r["fulfilment_id"]]) for r in rows]


def _fulfilment(r: asyncpg.Record, items: list[Item]) -> Fulfilment:
    return Fulfilment(
        fulfilment_id=str(r["fulfilment_id"]),
        order_id=r["order_id"],
        channel=r["channel"],
        location_id=r["location_id"],
        kind=Kind(r["kind"]),
        items=tuple(items),
        status=Status(r["status"]),
        pickup_location_id=r["pickup_location_id"],
        carrier=r["carrier"],
        tracking_number=r["tracking_number"],
        reason_code=r["reason_code"],
        pickup_code_hash=bytes(r["pickup_code_hash"] or b""),
        plan_number=r["plan_number"],
        accept_by=r["accept_by"],
        collect_by=r["collect_by"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        cancel_on_arrival=r["cancel_on_arrival"],
    )


async def save(conn: Connection, f: Fulfilment) -> Fulfilment:
    """Write a task's state and picked units back (the row is locked by the caller)."""
    updated_at = await conn.fetchval(
        """
        UPDATE fulfilment.fulfilments
        SET status = $2, carrier = $3, tracking_number = $4, reason_code = $5,
            pickup_code_hash = $6, collect_by = $7, cancel_on_arrival = $8, updated_at = now()
        WHERE fulfilment_id = $1
        RETURNING updated_at
        """,
        uuid.UUID(f.fulfilment_id),
        f.status.value,
        f.carrier,
        f.tracking_number,
        f.reason_code,
        f.pickup_code_hash or None,
        f.collect_by,
        f.cancel_on_arrival,
    )
    await conn.executemany(
        "UPDATE fulfilment.fulfilment_items SET picked_quantity = $3 "
        "WHERE fulfilment_id = $1 AND sku = $2",
        [(uuid.UUID(f.fulfilment_id), i.sku, i.picked) for i in f.items],
    )
    # Items of order lines cancelled while the task goes on.
    await conn.execute(
        "DELETE FROM fulfilment.fulfilment_items "
        "WHERE fulfilment_id = $1 AND line_number <> ALL($2::int[])",
        uuid.UUID(f.fulfilment_id),
        [i.line_number for i in f.items],
    )
    return replace(f, updated_at=updated_at)


async def queue(
    conn: Connection,
    location_id: str,
    statuses: Sequence[Status],
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Fulfilment]:
    """A location's tasks in ``statuses``, oldest first, after a page position.

    A pickup store's queue also holds the transfers coming to it once they are
    on the road: it receives them, marks them ready and hands them over. With
    no ``statuses``, the location's work to do: tasks not yet shipped, pickups
    waiting, and transfers coming to it or waiting there.
    """
    rows = await conn.fetch(
        """
        SELECT * FROM fulfilment.fulfilments
        WHERE CASE WHEN cardinality($2::text[]) > 0 THEN
                  (location_id = $1
                   OR (pickup_location_id = $1 AND kind = 'transfer_to_store'
                       AND status IN ('shipped', 'received', 'ready_for_pickup', 'collected',
                                      'expired')))
                  AND status = ANY($2::text[])
              ELSE
                  (location_id = $1 AND status IN ('created', 'accepted', 'picked', 'packed'))
                  OR (location_id = $1 AND kind = 'pickup_at_store'
                      AND status = 'ready_for_pickup')
                  OR (pickup_location_id = $1 AND kind = 'transfer_to_store'
                      AND status IN ('shipped', 'received', 'ready_for_pickup'))
              END
          AND ($3::timestamptz IS NULL OR (created_at, fulfilment_id) > ($3, $4::uuid))
        ORDER BY created_at, fulfilment_id
        LIMIT $5
        """,
        location_id,
        [s.value for s in statuses],
        after[0] if after else None,
        uuid.UUID(after[1]) if after else None,
        limit,
    )
    return await _with_items(conn, rows)


async def open_for_order(conn: Connection, order_id: str) -> list[Fulfilment]:
    """An order's tasks that have not ended, locked, in id order."""
    rows = await conn.fetch(
        """
        SELECT * FROM fulfilment.fulfilments
        WHERE order_id = $1 AND status NOT IN ('collected', 'rejected', 'cancelled', 'expired')
        ORDER BY fulfilment_id FOR UPDATE
        """,
        order_id,
    )
    return await _with_items(conn, rows)


async def claim_due(conn: Connection, limit: int) -> list[Fulfilment]:
    """Tasks past their accept-by or collect-by time, locked (SKIP LOCKED across replicas)."""
    rows = await conn.fetch(
        """
        SELECT * FROM fulfilment.fulfilments
        WHERE (status = 'created' AND accept_by < now())
           OR (status = 'ready_for_pickup' AND collect_by < now())
        ORDER BY fulfilment_id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return await _with_items(conn, rows)


async def open_task_figures(
    conn: Connection,
) -> tuple[dict[tuple[Kind, Status], int], dict[Kind, float]]:
    """Open tasks per (kind, status), and the age in seconds of the oldest unaccepted per kind."""
    rows = await conn.fetch(
        """
        SELECT kind, status, count(*) AS tasks,
               extract(epoch FROM now() - min(created_at)) AS oldest_seconds
        FROM fulfilment.fulfilments
        WHERE status IN ('created', 'accepted', 'picked', 'packed', 'received', 'ready_for_pickup')
           OR (status = 'shipped' AND kind = 'transfer_to_store')
        GROUP BY kind, status
        """
    )
    counts = {(Kind(r["kind"]), Status(r["status"])): int(r["tasks"]) for r in rows}
    oldest = {Kind(r["kind"]): float(r["oldest_seconds"]) for r in rows if r["status"] == "created"}
    return counts, oldest
