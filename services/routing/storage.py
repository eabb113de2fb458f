"""SQL of the routing service (schema ``routing``)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

from omni.routing.v1 import routing_service_pb2 as service_pb
from omnistock.db import Connection
from services.routing import convert, domain, planner
from services.routing.domain import AllocationStatus, OrderStatus
from services.routing.planner import FulfilmentType, Method, SourceKind

# -- locations and rules ------------------------------------------------------------------


async def network_version(conn: Connection) -> int:
    """The version of the locations, bumped by every change."""
    version: int = await conn.fetchval("SELECT version FROM routing.network_version")
    return version


async def load_locations(conn: Connection) -> dict[str, planner.Location]:
    """Every location the ledger announced."""
    rows = await conn.fetch("SELECT * FROM routing.locations")
    return {
        r["location_id"]: planner.Location(
            location_id=r["location_id"],
            kind=SourceKind(r["kind"]),
            name=r["name"],
            position=planner.GeoPoint(r["latitude"], r["longitude"]),
            ship_from_store=r["ship_from_store"],
            click_and_collect=r["click_and_collect"],
            accepts_returns=r["accepts_returns"],
            daily_capacity=r["daily_capacity"],
            closed=r["closed"],
        )
        for r in rows
    }


async def upsert_location(conn: Connection, loc: planner.Location) -> None:
    """Remember a location as the ledger announced it."""
    await conn.execute(
        """
        INSERT INTO routing.locations (location_id, kind, name, latitude, longitude,
            ship_from_store, click_and_collect, accepts_returns, daily_capacity, closed)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (location_id) DO UPDATE SET kind = EXCLUDED.kind, name = EXCLUDED.name,
            latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude,
            ship_from_store = EXCLUDED.ship_from_store,
            click_and_collect = EXCLUDED.click_and_collect,
            accepts_returns = EXCLUDED.accepts_returns,
            daily_capacity = EXCLUDED.daily_capacity, closed = EXCLUDED.closed,
            updated_at = now()
        """,
        loc.location_id,
        loc.kind.value,
        loc.name,
        loc.position.latitude,
        loc.position.longitude,
        loc.ship_from_store,
        loc.click_and_collect,
        loc.accepts_returns,
        loc.daily_capacity,
        loc.closed,
    )
    await conn.execute("UPDATE routing.network_version SET version = version + 1")


async def rules_version(conn: Connection) -> int:
    """The version of the rules in force; 0 before anyone set them."""
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM routing.rules")
    return version


async def load_rules(conn: Connection) -> tuple[planner.Rules, datetime | None]:
    """The rules in force, and when they were set (defaults before anyone set them)."""
    row = await conn.fetchrow(
        "SELECT version, body::text AS body, created_at FROM routing.rules "
        "ORDER BY version DESC LIMIT 1"
    )
    if row is None:
        return planner.Rules(), None
    return convert.rules_from_json(row["version"], row["body"]), row["created_at"]


async def save_rules(conn: Connection, rules: planner.Rules) -> tuple[int, datetime]:
    """Keep ``rules`` as the next version; the version and when."""
    await conn.execute("LOCK TABLE routing.rules IN SHARE ROW EXCLUSIVE MODE")
    row = await conn.fetchrow(
        """
        INSERT INTO routing.rules (version, body)
        SELECT coalesce(max(version), 0) + 1, $1::jsonb FROM routing.rules
        RETURNING version, created_at
        """,
        convert.rules_to_json(rules),
    )
    assert row is not None
    return row["version"], row["created_at"]


# -- orders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredOrder:
    """An order with what is kept beside it."""

    order: domain.Order
    request: bytes
    request_id: str
    plan: bytes | None
    reroute_cause: str
    lease_token: uuid.UUID | None
    lease_until: datetime | None


async def insert_order(
    conn: Connection,
    order: domain.Order,
    *,
    request: bytes,
    request_id: str,
    lease_token: uuid.UUID,
    lease: timedelta,
) -> bool:
    """Keep a new order in ROUTING under a lease; False when the id is taken.

    ``work_due_at`` is the lease's end: if this routing is interrupted, the
    routing worker resumes it then.
    """
    inserted = await conn.fetchval(
        """
        INSERT INTO routing.orders (order_id, channel, delivery_method, request, request_id,
            status, lease_token, lease_until, work_due_at)
        VALUES ($1, $2, $3, $4, $5, 'routing', $6, now() + $7, now() + $7)
        ON CONFLICT (order_id) DO NOTHING
        RETURNING true
        """,
        order.order_id,
        order.channel,
        order.method.value,
        request,
        request_id,
        lease_token,
        lease,
    )
    if not inserted:
        return False
    await conn.executemany(
        "INSERT INTO routing.order_lines (order_id, line_number, sku, quantity) "
        "VALUES ($1, $2, $3, $4)",
        [(order.order_id, line.line_number, line.sku, line.quantity) for line in order.lines],
    )
    return True


async def take_lease(conn: Connection, order_id: str, token: uuid.UUID, lease: timedelta) -> bool:
    """Take an order's lease if nobody holds it; work is due again when it runs out."""
    taken = await conn.fetchval(
        """
        UPDATE routing.orders
        SET lease_token = $2, lease_until = now() + $3,
            work_due_at = CASE WHEN work_due_at IS NULL THEN NULL ELSE now() + $3 END
        WHERE order_id = $1 AND (lease_until IS NULL OR lease_until < now())
        RETURNING true
        """,
        order_id,
        token,
        lease,
    )
    return bool(taken)


async def drop_lease(conn: Connection, order_id: str, token: uuid.UUID) -> None:
    """Give a lease back without changing the order."""
    await conn.execute(
        "UPDATE routing.orders SET lease_token = NULL, lease_until = NULL "
        "WHERE order_id = $1 AND lease_token = $2",
        order_id,
        token,
    )


async def claim_due(conn: Connection, limit: int, lease: timedelta) -> list[tuple[str, uuid.UUID]]:
    """Orders whose routing work is due, leased to the caller (SKIP LOCKED across replicas)."""
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT order_id FROM routing.orders
            WHERE work_due_at <= now() AND (lease_until IS NULL OR lease_until < now())
            ORDER BY work_due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        UPDATE routing.orders o
        SET lease_token = gen_random_uuid(), lease_until = now() + $2, work_due_at = now() + $2
        FROM due WHERE o.order_id = due.order_id
        RETURNING o.order_id, o.lease_token
        """,
        limit,
        lease,
    )
    return [(r["order_id"], r["lease_token"]) for r in rows]


async def load_order(conn: Connection, order_id: str, *, lock: bool = False) -> StoredOrder | None:
    """An order with its lines and allocations (row-locked when ``lock``)."""
    row = await conn.fetchrow(
        "SELECT * FROM routing.orders WHERE order_id = $1" + (" FOR UPDATE" if lock else ""),
        order_id,
    )
    if row is None:
        return None
    lines = await conn.fetch(
        "SELECT * FROM routing.order_lines WHERE order_id = $1 ORDER BY line_number", order_id
    )
    allocations = await conn.fetch(
        "SELECT * FROM routing.allocations WHERE order_id = $1 "
        "ORDER BY plan_number, line_number, location_id, allocation_id",
        order_id,
    )
    request = bytes(row["request"])
    order_request = service_pb.RouteOrderRequest.FromString(request)
    given = convert.order_in(order_request)
    order = domain.Order(
        order_id=row["order_id"],
        channel=row["channel"],
        method=Method(row["delivery_method"]),
        customer=given.customer,
        lines=tuple(
            domain.OrderLine(
                line_number=r["line_number"],
                sku=r["sku"],
                quantity=r["quantity"],
                cancelled=r["cancelled_quantity"],
                fulfilled=r["fulfilled_quantity"],
                returned=r["returned_quantity"],
            )
            for r in lines
        ),
        status=OrderStatus(row["status"]),
        allow_split=given.allow_split,
        deliver_by=given.deliver_by,
        cart_reservation_id=given.cart_reservation_id,
        plan_number=row["plan_number"],
        failed=tuple(row["failed_location_ids"]),
        attention_reason=row["attention_reason"],
        allocations=tuple(_allocation(r) for r in allocations),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
    return StoredOrder(
        order=order,
        request=request,
        request_id=row["request_id"],
        plan=bytes(row["plan"]) if row["plan"] is not None else None,
        reroute_cause=row["reroute_cause"],
        lease_token=row["lease_token"],
        lease_until=row["lease_until"],
    )


def _allocation(r: asyncpg.Record) -> domain.Allocation:
    return domain.Allocation(
        allocation_id=str(r["allocation_id"]),
        line_number=r["line_number"],
        sku=r["sku"],
        location_id=r["location_id"],
        quantity=r["quantity"],
        type=FulfilmentType(r["type"]),
        pickup_location_id=r["pickup_location_id"],
        reservation_id=str(r["reservation_id"]),
        reservation_line=r["reservation_line"],
        status=AllocationStatus(r["status"]),
        plan_number=r["plan_number"],
        fulfilled=r["fulfilled_quantity"],
    )


async def save_order(
    conn: Connection,
    order: domain.Order,
    *,
    plan: bytes | None = None,
    work_due: bool = False,
    reroute_cause: str | None = None,
    release_lease: bool = False,
) -> None:
    """Write an order's state, lines and allocations back (the row is locked by the caller)."""
    await conn.execute(
        """
        UPDATE routing.orders
        SET status = $2, plan_number = $3, plan = coalesce($4, plan),
            failed_location_ids = $5, attention_reason = $6,
            work_due_at = CASE WHEN $7 THEN now() ELSE NULL END,
            reroute_cause = coalesce($8, reroute_cause),
            lease_token = CASE WHEN $9 THEN NULL ELSE lease_token END,
            lease_until = CASE WHEN $9 THEN NULL ELSE lease_until END,
            updated_at = coalesce($10, now())
        WHERE order_id = $1
        """,
        order.order_id,
        order.status.value,
        order.plan_number,
        plan,
        list(order.failed),
        order.attention_reason,
        work_due,
        reroute_cause,
        release_lease,
        order.updated_at,
    )
    await conn.executemany(
        """
        UPDATE routing.order_lines
        SET cancelled_quantity = $3, fulfilled_quantity = $4, returned_quantity = $5
        WHERE order_id = $1 AND line_number = $2
        """,
        [
            (order.order_id, line.line_number, line.cancelled, line.fulfilled, line.returned)
            for line in order.lines
        ],
    )
    await conn.executemany(
        """
        INSERT INTO routing.allocations (allocation_id, order_id, line_number, sku, location_id,
            quantity, fulfilled_quantity, type, pickup_location_id, reservation_id,
            reservation_line, status, plan_number)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        ON CONFLICT (allocation_id) DO UPDATE SET quantity = EXCLUDED.quantity,
            fulfilled_quantity = EXCLUDED.fulfilled_quantity, status = EXCLUDED.status
        """,
        [
            (
                uuid.UUID(a.allocation_id),
                order.order_id,
                a.line_number,
                a.sku,
                a.location_id,
                a.quantity,
                a.fulfilled,
                a.type.value,
                a.pickup_location_id,
                uuid.UUID(a.reservation_id),
                a.reservation_line,
                a.status.value,
                a.plan_number,
            )
            for a in order.allocations
        ],
    )


async def orders_needing_attention(conn: Connection) -> int:
    """How many orders need attention now."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM routing.orders WHERE status = 'needs_attention'"
    )
    return count


# -- capacity -----------------------------------------------------------------------------


async def capacity_used(
    conn: Connection, location_ids: Collection[str], day: date
) -> dict[str, int]:
    """Orders each location took on ``day``."""
    rows = await conn.fetch(
        "SELECT location_id, used FROM routing.capacity_usage "
        "WHERE day = $1 AND location_id = ANY($2::text[])",
        day,
        list(location_ids),
    )
    return {r["location_id"]: r["used"] for r in rows}


async def take_capacity(
    conn: Connection, order_id: str, capacities: Mapping[str, int], day: date
) -> list[str]:
    """Count the order once against each capacity-limited source; the ones already full.

    Runs in the transaction that keeps the allocations, so a full source makes
    the whole write roll back and the order is planned again without it.
    """
    full: list[str] = []
    for location_id in sorted(capacities):
        first = await conn.fetchval(
            "INSERT INTO routing.order_sources (order_id, location_id, day) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING true",
            order_id,
            location_id,
            day,
        )
        if not first:
            continue  # this order already counts against the source
        taken = await conn.fetchval(
            """
            INSERT INTO routing.capacity_usage AS u (location_id, day, used) VALUES ($1, $2, 1)
            ON CONFLICT (location_id, day) DO UPDATE SET used = u.used + 1
            WHERE u.used < $3
            RETURNING used
            """,
            location_id,
            day,
            capacities[location_id],
        )
        if taken is None:
            full.append(location_id)
    return full


# -- returns ------------------------------------------------------------------------------


async def insert_return(conn: Connection, r: domain.OrderReturn, body: bytes) -> bool:
    """Keep a routed return; False when its id is taken."""
    inserted = await conn.fetchval(
        "INSERT INTO routing.returns (return_id, order_id, location_id, body) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
        r.return_id,
        r.order_id,
        r.location_id,
        body,
    )
    return bool(inserted)


async def load_returns(conn: Connection, order_id: str) -> list[bytes]:
    """An order's returns as stored, oldest first."""
    rows = await conn.fetch(
        "SELECT body FROM routing.returns WHERE order_id = $1 ORDER BY created_at, return_id",
        order_id,
    )
    return [bytes(r["body"]) for r in rows]
