"""The reservation service's PostgreSQL adapter: SQL in, domain values out.

Every writer takes its locks in one order — skus, then stock rows, then
reservations, each sorted by key — so concurrent holds, releases, expiries
and projections cannot deadlock one another.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import asyncpg

from omnistock.db import Connection
from services.reservation.domain import (
    ChannelRules,
    Kind,
    Line,
    LineStatus,
    Reservation,
    Rules,
    StockKey,
    StockRow,
)

SCHEMA = "reservation"


# -- master data and rules ------------------------------------------------------


async def lock_skus(conn: Connection, skus: Collection[str]) -> dict[str, int]:
    """Lock the known ones of ``skus`` (sorted) and return their availability versions."""
    rows = await conn.fetch(
        "SELECT sku, availability_version FROM reservation.skus "
        "WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE",
        sorted(set(skus)),
    )
    return {r["sku"]: r["availability_version"] for r in rows}


async def lock_and_bump_skus(conn: Connection, skus: Collection[str]) -> dict[str, int]:
    """Lock the known ones of ``skus`` (sorted) and increase their availability versions.

    One round trip for the hot path; a version that increases without a change
    is harmless (readers only need versions to grow).
    """
    rows = await conn.fetch(
        """
        UPDATE reservation.skus k SET availability_version = k.availability_version + 1
        FROM (SELECT sku FROM reservation.skus WHERE sku = ANY($1::text[])
              ORDER BY sku FOR UPDATE) AS locked
        WHERE k.sku = locked.sku
        RETURNING k.sku, k.availability_version
        """,
        sorted(set(skus)),
    )
    return {r["sku"]: r["availability_version"] for r in rows}


async def bump_versions(conn: Connection, skus: Collection[str]) -> dict[str, int]:
    """Increase the availability version of ``skus`` (locked by the caller)."""
    rows = await conn.fetch(
        "UPDATE reservation.skus SET availability_version = availability_version + 1 "
        "WHERE sku = ANY($1::text[]) RETURNING sku, availability_version",
        sorted(set(skus)),
    )
    return {r["sku"]: r["availability_version"] for r in rows}


async def known_locations(conn: Connection, location_ids: Collection[str]) -> set[str]:
    """The ones of ``location_ids`` the ledger announced."""
    rows = await conn.fetch(
        "SELECT location_id FROM reservation.locations WHERE location_id = ANY($1::text[])",
        list(set(location_ids)),
    )
    return {r["location_id"] for r in rows}


async def upsert_sku(conn: Connection, sku: str) -> None:
    """Remember a SKU the ledger announced."""
    await conn.execute("INSERT INTO reservation.skus (sku) VALUES ($1) ON CONFLICT DO NOTHING", sku)


async def ensure_known(conn: Connection, sku: str, location_id: str) -> None:
    """Make sure a SKU and location a movement names exist here (normally announced first)."""
    await conn.execute("INSERT INTO reservation.skus (sku) VALUES ($1) ON CONFLICT DO NOTHING", sku)
    added = await conn.fetchval(
        "INSERT INTO reservation.locations (location_id) VALUES ($1) ON CONFLICT DO NOTHING "
        "RETURNING true",
        location_id,
    )
    if added:
        await bump_rules_version(conn)  # the cached rules list the known locations


async def upsert_location(conn: Connection, location_id: str, closed: bool) -> bool:
    """Remember a location; returns True when it is new or its closed flag changed."""
    changed: bool | None = await conn.fetchval(
        """
        INSERT INTO reservation.locations AS l (location_id, closed) VALUES ($1, $2)
        ON CONFLICT (location_id) DO UPDATE SET closed = excluded.closed
        WHERE l.closed IS DISTINCT FROM excluded.closed
        RETURNING true
        """,
        location_id,
        closed,
    )
    return bool(changed)


async def rules_version(conn: Connection) -> int:
    """The version of the rules; changes whenever any rule or closed flag does."""
    version: int = await conn.fetchval("SELECT version FROM reservation.rules_version")
    return version


async def bump_rules_version(conn: Connection) -> None:
    """Mark every replica's cached rules stale (in the caller's transaction)."""
    await conn.execute("UPDATE reservation.rules_version SET version = version + 1")


async def load_rules(conn: Connection) -> Rules:
    """Every channel's rules, every location's safety stock and the closed locations."""
    channel_rows = await conn.fetch(
        """
        SELECT c.channel, c.cart_ttl_seconds, c.safety_stock, c.low_stock_threshold,
               coalesce(array_agg(cl.location_id ORDER BY cl.location_id)
                        FILTER (WHERE cl.location_id IS NOT NULL), '{}') AS location_ids
        FROM reservation.channels c
        LEFT JOIN reservation.channel_locations cl USING (channel)
        GROUP BY c.channel
        """
    )
    safety_rows = await conn.fetch(
        "SELECT location_id, safety_stock FROM reservation.location_safety_stock"
    )
    locations = await conn.fetch("SELECT location_id, closed FROM reservation.locations")
    return Rules(
        channels={
            r["channel"]: ChannelRules(
                channel=r["channel"],
                location_ids=tuple(r["location_ids"]),
                cart_ttl=timedelta(seconds=r["cart_ttl_seconds"]),
                safety_stock=r["safety_stock"],
                low_stock_threshold=r["low_stock_threshold"],
            )
            for r in channel_rows
        },
        location_safety={r["location_id"]: r["safety_stock"] for r in safety_rows},
        closed_locations=frozenset(r["location_id"] for r in locations if r["closed"]),
        locations=frozenset(r["location_id"] for r in locations),
    )


async def save_channel_rules(conn: Connection, rules: ChannelRules) -> None:
    """Create or replace one channel's rules whole."""
    await conn.execute(
        """
        INSERT INTO reservation.channels AS c
            (channel, cart_ttl_seconds, safety_stock, low_stock_threshold, updated_at)
        VALUES ($1, $2, $3, $4, now())
        ON CONFLICT (channel) DO UPDATE SET
            cart_ttl_seconds = excluded.cart_ttl_seconds,
            safety_stock = excluded.safety_stock,
            low_stock_threshold = excluded.low_stock_threshold,
            updated_at = now()
        """,
        rules.channel,
        int(rules.cart_ttl.total_seconds()),
        rules.safety_stock,
        rules.low_stock_threshold,
    )
    await conn.execute(
        "DELETE FROM reservation.channel_locations WHERE channel = $1", rules.channel
    )
    await conn.execute(
        "INSERT INTO reservation.channel_locations (channel, location_id) "
        "SELECT $1, unnest($2::text[])",
        rules.channel,
        list(rules.location_ids),
    )
    await bump_rules_version(conn)


async def save_location_safety(conn: Connection, location_id: str, safety_stock: int) -> None:
    """Set (or, with 0, remove) a location's safety stock."""
    if safety_stock == 0:
        await conn.execute(
            "DELETE FROM reservation.location_safety_stock WHERE location_id = $1", location_id
        )
    else:
        await conn.execute(
            """
            INSERT INTO reservation.location_safety_stock (location_id, safety_stock)
            VALUES ($1, $2)
            ON CONFLICT (location_id) DO UPDATE SET safety_stock = excluded.safety_stock
            """,
            location_id,
            safety_stock,
        )
    await bump_rules_version(conn)


# -- stock ------------------------------------------------------------------------


def _row(record: asyncpg.Record) -> StockRow:
    return StockRow(
        record["sku"], record["location_id"], record["on_hand"], record["held"],
        record["departing"],
    )  # fmt: skip


async def lock_stock(
    conn: Connection, keys: Collection[StockKey]
) -> dict[StockKey, tuple[StockRow, int]]:
    """Lock the existing stock rows of ``keys`` (sorted); returns row and ledger version."""
    ordered = sorted(set(keys))
    rows = await conn.fetch(
        """
        SELECT s.sku, s.location_id, s.on_hand, s.held, s.departing, s.ledger_version
        FROM reservation.stock s
        JOIN unnest($1::text[], $2::text[]) AS k (sku, location_id) USING (sku, location_id)
        ORDER BY s.sku, s.location_id
        FOR UPDATE OF s
        """,
        [k[0] for k in ordered],
        [k[1] for k in ordered],
    )
    return {(r["sku"], r["location_id"]): (_row(r), r["ledger_version"]) for r in rows}


async def save_stock(
    conn: Connection, rows: Iterable[StockRow], ledger_versions: dict[StockKey, int] | None = None
) -> None:
    """Write on-hand and held of ``rows`` (locked or new); tracks since when a row is short."""
    rows = list(rows)
    if not rows:
        return
    versions = ledger_versions or {}
    await conn.execute(
        """
        INSERT INTO reservation.stock AS s
            (sku, location_id, on_hand, held, departing, ledger_version, short_since, updated_at)
        SELECT k.sku, k.location_id, k.on_hand, k.held, k.departing,
               coalesce(k.ledger_version, 0),
               CASE WHEN k.held + k.departing > k.on_hand THEN now() END, now()
        FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                    $6::bigint[])
             AS k (sku, location_id, on_hand, held, departing, ledger_version)
        ON CONFLICT (sku, location_id) DO UPDATE SET
            on_hand = excluded.on_hand,
            held = excluded.held,
            departing = excluded.departing,
            ledger_version = greatest(s.ledger_version, excluded.ledger_version),
            short_since = CASE WHEN excluded.held + excluded.departing > excluded.on_hand
                               THEN coalesce(s.short_since, now()) END,
            updated_at = now()
        """,
        [r.sku for r in rows],
        [r.location_id for r in rows],
        [r.on_hand for r in rows],
        [r.held for r in rows],
        [r.departing for r in rows],
        [versions.get(r.key) for r in rows],
    )


async def stock_of_skus(conn: Connection, skus: Collection[str]) -> dict[StockKey, StockRow]:
    """Every stock row of ``skus``, at every location (read, not locked)."""
    rows = await conn.fetch(
        "SELECT sku, location_id, on_hand, held, departing FROM reservation.stock "
        "WHERE sku = ANY($1::text[])",
        list(set(skus)),
    )
    return {(r["sku"], r["location_id"]): _row(r) for r in rows}


async def snapshot(
    conn: Connection, skus: Collection[str]
) -> tuple[dict[str, int], dict[StockKey, StockRow]]:
    """Versions and stock rows of ``skus`` read in one statement, so they agree."""
    rows = await conn.fetch(
        """
        SELECT k.sku, k.availability_version, s.location_id, s.on_hand, s.held, s.departing
        FROM reservation.skus k
        LEFT JOIN reservation.stock s USING (sku)
        WHERE k.sku = ANY($1::text[])
        """,
        list(set(skus)),
    )
    versions = {r["sku"]: r["availability_version"] for r in rows}
    stock = {(r["sku"], r["location_id"]): _row(r) for r in rows if r["location_id"] is not None}
    return versions, stock


async def write_holds(
    conn: Connection,
    reservations: Sequence[Reservation],
    rows: Iterable[StockRow],
    answers: Sequence[tuple[str, bytes, bytes]],
) -> None:
    """New holds, their stock rows (which exist: a hold needs stock) and their
    idempotency answers, in one statement."""
    rows = list(rows)
    lines = [(r.reservation_id, line) for r in reservations for line in r.lines]
    await conn.execute(
        """
        WITH new_reservations AS (
            INSERT INTO reservation.reservations
                (reservation_id, channel, reference, kind, status, expires_at, created_at,
                 updated_at)
            SELECT r.*, r.created_at
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::timestamptz[], $7::timestamptz[])
                 AS r (reservation_id, channel, reference, kind, status, expires_at, created_at)
            RETURNING 1
        ), new_lines AS (
            INSERT INTO reservation.reservation_lines
                (reservation_id, line_number, sku, location_id, quantity, status)
            SELECT l.*, 'active'
            FROM unnest($8::uuid[], $9::int[], $10::text[], $11::text[], $12::bigint[]) AS l
            RETURNING 1
        ), answers AS (
            INSERT INTO reservation.idempotency_keys (method, request_id, request_hash, response)
            SELECT 'Reserve', * FROM unnest($13::text[], $14::bytea[], $15::bytea[])
            RETURNING 1
        )
        UPDATE reservation.stock s
        SET held = k.held,
            short_since = CASE WHEN k.held + s.departing > s.on_hand
                               THEN coalesce(s.short_since, now()) END,
            updated_at = now()
        FROM unnest($16::text[], $17::text[], $18::bigint[]) AS k (sku, location_id, held)
        WHERE s.sku = k.sku AND s.location_id = k.location_id
        """,
        [uuid.UUID(r.reservation_id) for r in reservations],
        [r.channel for r in reservations],
        [r.reference for r in reservations],
        [r.kind.value for r in reservations],
        [r.status.value for r in reservations],
        [r.expires_at for r in reservations],
        [r.created_at for r in reservations],
        [uuid.UUID(rid) for rid, _ in lines],
        [line.line_number for _, line in lines],
        [line.sku for _, line in lines],
        [line.location_id for _, line in lines],
        [line.quantity for _, line in lines],
        [a[0] for a in answers],
        [a[1] for a in answers],
        [a[2] for a in answers],
        [r.sku for r in rows],
        [r.location_id for r in rows],
        [r.held for r in rows],
    )


async def reserve_context(
    conn: Connection, request_ids: Sequence[str]
) -> tuple[int, dict[str, tuple[bytes, bytes]]]:
    """The rules version and the stored answers of ``request_ids``, in one round trip."""
    rows = await conn.fetch(
        """
        SELECT v.version, a.request_id, a.request_hash, a.response
        FROM reservation.rules_version v
        LEFT JOIN reservation.idempotency_keys a
               ON a.method = 'Reserve' AND a.request_id = ANY($1::text[])
        """,
        list(request_ids),
    )
    answers = {
        r["request_id"]: (bytes(r["request_hash"]), bytes(r["response"]))
        for r in rows
        if r["request_id"] is not None
    }
    version: int = rows[0]["version"]
    return version, answers


async def overdue_shortages(conn: Connection, grace: timedelta, limit: int) -> list[StockKey]:
    """Rows short for longer than ``grace`` (a departure whose hold was never consumed)."""
    rows = await conn.fetch(
        "SELECT sku, location_id FROM reservation.stock "
        "WHERE short_since < now() - $1::interval ORDER BY short_since LIMIT $2",
        grace,
        limit,
    )
    return [(r["sku"], r["location_id"]) for r in rows]


# -- reservations -----------------------------------------------------------------


async def save_reservations(conn: Connection, reservations: Sequence[Reservation]) -> None:
    """Write the changed header and lines of reservations (locked by the caller)."""
    if not reservations:
        return
    await conn.execute(
        """
        UPDATE reservation.reservations r
        SET reference = k.reference, kind = k.kind, status = k.status,
            expires_at = k.expires_at, updated_at = k.updated_at
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                    $6::timestamptz[]) AS k (reservation_id, reference, kind, status,
                                             expires_at, updated_at)
        WHERE r.reservation_id = k.reservation_id
        """,
        [uuid.UUID(r.reservation_id) for r in reservations],
        [r.reference for r in reservations],
        [r.kind.value for r in reservations],
        [r.status.value for r in reservations],
        [r.expires_at for r in reservations],
        [r.updated_at for r in reservations],
    )
    lines = [(r.reservation_id, line) for r in reservations for line in r.lines]
    await conn.execute(
        """
        UPDATE reservation.reservation_lines l
        SET consumed_quantity = k.consumed_quantity, released_quantity = k.released_quantity,
            status = k.status
        FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::bigint[], $5::text[])
             AS k (reservation_id, line_number, consumed_quantity, released_quantity, status)
        WHERE l.reservation_id = k.reservation_id AND l.line_number = k.line_number
          AND (l.consumed_quantity, l.released_quantity, l.status)
              IS DISTINCT FROM (k.consumed_quantity, k.released_quantity, k.status)
        """,
        [uuid.UUID(rid) for rid, _ in lines],
        [line.line_number for _, line in lines],
        [line.consumed_quantity for _, line in lines],
        [line.released_quantity for _, line in lines],
        [line.status.value for _, line in lines],
    )


async def load_reservations(
    conn: Connection, reservation_ids: Collection[str], *, lock: bool = False
) -> dict[str, Reservation]:
    """Reservations by id (those that exist), locked in id order when ``lock``."""
    ids = sorted({uuid.UUID(rid) for rid in reservation_ids})
    headers = await conn.fetch(
        "SELECT reservation_id, channel, reference, kind, expires_at, created_at, updated_at "
        "FROM reservation.reservations WHERE reservation_id = ANY($1::uuid[]) "
        "ORDER BY reservation_id" + (" FOR UPDATE" if lock else ""),
        ids,
    )
    lines = await conn.fetch(
        "SELECT reservation_id, line_number, sku, location_id, quantity, consumed_quantity, "
        "released_quantity, status FROM reservation.reservation_lines "
        "WHERE reservation_id = ANY($1::uuid[]) "
        "ORDER BY reservation_id, line_number",
        ids,
    )
    by_id: dict[str, list[Line]] = {}
    for r in lines:
        by_id.setdefault(str(r["reservation_id"]), []).append(
            Line(
                line_number=r["line_number"],
                sku=r["sku"],
                location_id=r["location_id"],
                quantity=r["quantity"],
                consumed_quantity=r["consumed_quantity"],
                released_quantity=r["released_quantity"],
                status=LineStatus(r["status"]),
            )
        )
    return {
        str(h["reservation_id"]): Reservation(
            reservation_id=str(h["reservation_id"]),
            channel=h["channel"],
            reference=h["reference"],
            kind=Kind(h["kind"]),
            lines=tuple(by_id.get(str(h["reservation_id"]), ())),
            created_at=h["created_at"],
            updated_at=h["updated_at"],
            expires_at=h["expires_at"],
        )
        for h in headers
    }


async def reservations_by_reference(
    conn: Connection,
    channel: str,
    reference: str,
    statuses: Collection[LineStatus],
    limit: int,
) -> list[str]:
    """Ids of ``channel``'s reservations with ``reference`` (of ``statuses``; any when
    empty), newest first, at most ``limit``."""
    rows = await conn.fetch(
        """
        SELECT reservation_id
        FROM reservation.reservations
        WHERE channel = $1 AND reference = $2
          AND (cardinality($3::text[]) = 0 OR status = ANY($3::text[]))
        ORDER BY created_at DESC, reservation_id DESC
        LIMIT $4
        """,
        channel,
        reference,
        sorted({status.value for status in statuses}),
        limit,
    )
    return [str(r["reservation_id"]) for r in rows]


async def active_reservations_at(conn: Connection, key: StockKey) -> list[str]:
    """Ids of reservations with an active line at (sku, location), newest first."""
    rows = await conn.fetch(
        """
        SELECT r.reservation_id
        FROM reservation.reservation_lines l
        JOIN reservation.reservations r USING (reservation_id)
        WHERE l.sku = $1 AND l.location_id = $2 AND l.status = 'active'
        ORDER BY r.created_at DESC, r.reservation_id DESC
        """,
        key[0],
        key[1],
    )
    return [str(r["reservation_id"]) for r in rows]


async def order_holds(conn: Connection, order_id: str, location_id: str) -> list[str]:
    """Ids of active order holds for ``order_id`` with a line at ``location_id``, oldest first."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT r.reservation_id, r.created_at
        FROM reservation.reservations r
        JOIN reservation.reservation_lines l USING (reservation_id)
        WHERE r.reference = $1 AND r.kind = 'order' AND r.status = 'active'
          AND l.location_id = $2 AND l.status = 'active'
        ORDER BY r.created_at, r.reservation_id
        """,
        order_id,
        location_id,
    )
    return [str(r["reservation_id"]) for r in rows]


async def due_cart_holds(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Active cart holds whose time to live has run out, oldest expiry first (not locked)."""
    rows = await conn.fetch(
        "SELECT reservation_id FROM reservation.reservations "
        "WHERE status = 'active' AND kind = 'cart' AND expires_at <= $1 "
        "ORDER BY expires_at LIMIT $2",
        now,
        limit,
    )
    return [str(r["reservation_id"]) for r in rows]


async def claim_due_cart_holds(
    conn: Connection, reservation_ids: Collection[str], now: datetime
) -> list[str]:
    """Lock those of ``reservation_ids`` still due; a row another sweeper holds is skipped."""
    rows = await conn.fetch(
        "SELECT reservation_id FROM reservation.reservations "
        "WHERE reservation_id = ANY($1::uuid[]) AND status = 'active' AND kind = 'cart' "
        "AND expires_at <= $2 ORDER BY reservation_id FOR UPDATE SKIP LOCKED",
        sorted({uuid.UUID(rid) for rid in reservation_ids}),
        now,
    )
    return [str(r["reservation_id"]) for r in rows]


async def record_consumption(
    conn: Connection, fulfilment_id: str, reservation_id: str, line_number: int, quantity: int
) -> None:
    """Keep what a fulfilment consumed of which line."""
    await conn.execute(
        "INSERT INTO reservation.consumptions "
        "(fulfilment_id, reservation_id, line_number, quantity) VALUES ($1, $2, $3, $4)",
        fulfilment_id,
        uuid.UUID(reservation_id),
        line_number,
        quantity,
    )


async def consumptions_of(conn: Connection, fulfilment_id: str) -> list[tuple[str, int, int]]:
    """What a fulfilment consumed: (reservation id, line number, units) each."""
    rows = await conn.fetch(
        "SELECT reservation_id, line_number, quantity FROM reservation.consumptions "
        "WHERE fulfilment_id = $1 ORDER BY reservation_id, line_number",
        fulfilment_id,
    )
    return [(str(r["reservation_id"]), r["line_number"], r["quantity"]) for r in rows]


async def active_hold_totals(conn: Connection) -> tuple[int, int]:
    """How many reservations are active and how many units they hold."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM reservation.reservations WHERE status = 'active') AS holds, "
        "(SELECT coalesce(sum(held), 0) FROM reservation.stock) AS units"
    )
    assert row is not None
    return int(row["holds"]), int(row["units"])


async def departures_at(
    conn: Connection, fulfilment_id: str, location_id: str, skus: Collection[str]
) -> dict[str, tuple[int, int]]:
    """(consumed, departed) per SKU of a fulfilment at a location, locked."""
    rows = await conn.fetch(
        "SELECT sku, consumed, departed FROM reservation.departures "
        "WHERE fulfilment_id = $1 AND location_id = $2 AND sku = ANY($3::text[]) "
        "ORDER BY sku FOR UPDATE",
        fulfilment_id,
        location_id,
        sorted(set(skus)),
    )
    return {r["sku"]: (r["consumed"], r["departed"]) for r in rows}


async def save_departures(
    conn: Connection, fulfilment_id: str, location_id: str, seen: Mapping[str, tuple[int, int]]
) -> None:
    """Keep both sides of each departure; one whose sides agree is done and deleted."""
    open_ = {sku: units for sku, units in seen.items() if units[0] != units[1]}
    done = [sku for sku, units in seen.items() if units[0] == units[1]]
    await conn.execute(
        """
        WITH gone AS (
            DELETE FROM reservation.departures
            WHERE fulfilment_id = $1 AND location_id = $2 AND sku = ANY($6::text[])
        )
        INSERT INTO reservation.departures (fulfilment_id, location_id, sku, consumed, departed)
        SELECT $1, $2, k.sku, k.consumed, k.departed
        FROM unnest($3::text[], $4::bigint[], $5::bigint[]) AS k (sku, consumed, departed)
        ON CONFLICT (fulfilment_id, sku, location_id) DO UPDATE
        SET consumed = excluded.consumed, departed = excluded.departed
        """,
        fulfilment_id,
        location_id,
        list(open_),
        [units[0] for units in open_.values()],
        [units[1] for units in open_.values()],
        done,
    )
