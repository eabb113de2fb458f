"""asyncpg SQL of the stock ledger. Every function runs on the caller's connection,
inside the caller's transaction; none commits on its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from omnistock.db import Connection
from services.ledger.domain import (
    Balance,
    IdempotencyKey,
    Location,
    LocationKind,
    MovementKind,
    Posting,
    PostingDraft,
    PostMovement,
    RecordedMovement,
    Sku,
    StockKey,
    StockState,
    TransferLine,
    describe,
)


@dataclass(frozen=True)
class BatchLookup:
    """What the ledger already knows about a batch, read in one round trip."""

    known_skus: set[str]
    known_locations: set[str]
    # Movements already recorded under the batch's keys: key → (movement id, digest).
    existing: dict[IdempotencyKey, tuple[str, str]]


async def look_up(
    conn: Connection,
    skus: Iterable[str],
    locations: Iterable[str],
    keys: Sequence[IdempotencyKey],
) -> BatchLookup:
    """Known SKUs and locations, and earlier movements under the batch's keys."""
    rows = await conn.fetch(
        """
        SELECT 'sku' AS what, sku AS id, NULL::bigint AS seq, NULL::uuid AS movement_id,
               NULL::text AS digest
        FROM ledger.skus WHERE sku = ANY($1::text[])
        UNION ALL
        SELECT 'location', location_id, NULL, NULL, NULL
        FROM ledger.locations WHERE location_id = ANY($2::text[])
        UNION ALL
        SELECT 'movement', m.device_id, m.device_sequence, m.movement_id, m.content_digest
        FROM ledger.movements m
        JOIN unnest($3::text[], $4::bigint[]) AS k(device_id, device_sequence)
          USING (device_id, device_sequence)
        """,
        list(skus),
        list(locations),
        [key.device_id for key in keys],
        [key.sequence for key in keys],
    )
    return BatchLookup(
        known_skus={row["id"] for row in rows if row["what"] == "sku"},
        known_locations={row["id"] for row in rows if row["what"] == "location"},
        existing={
            IdempotencyKey(row["id"], row["seq"]): (str(row["movement_id"]), row["digest"])
            for row in rows
            if row["what"] == "movement"
        },
    )


async def lock_transfers(
    conn: Connection, lines: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], TransferLine]:
    """Lock transfer lines (in the given, sorted order), existing or not, and return those
    that exist.

    A row lock cannot lock a line that does not exist yet, and two batches may
    create the same line at once; a transaction-scoped advisory lock per
    (transfer, sku) serialises them, so the second sees the first's line.
    """
    if not lines:
        return {}
    await conn.execute(
        """
        SELECT pg_advisory_xact_lock(hashtextextended('omni-transfer:' || t || '/' || s, 0))
        FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(t, s, n)
        ORDER BY n
        """,
        [line[0] for line in lines],
        [line[1] for line in lines],
    )
    rows = await conn.fetch(
        """
        SELECT t.* FROM ledger.transfers t
        JOIN unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(transfer_id, sku, n)
          USING (transfer_id, sku)
        ORDER BY k.n
        FOR UPDATE OF t
        """,
        [line[0] for line in lines],
        [line[1] for line in lines],
    )
    return {
        (row["transfer_id"], row["sku"]): TransferLine(
            row["transfer_id"],
            row["sku"],
            row["source_location_id"],
            row["destination_location_id"],
            row["quantity_sent"],
            row["quantity_received"],
        )
        for row in rows
    }


async def lock_balances(conn: Connection, keys: Sequence[StockKey]) -> dict[StockKey, Balance]:
    """Create missing balance rows, then lock all of ``keys`` in their sorted order.

    Every writer locks in the same global (sku, location, state) order, so
    concurrent batches over overlapping stock wait for each other instead of
    deadlocking.
    """
    skus = [key.sku for key in keys]
    locations = [key.location_id for key in keys]
    states = [key.state.value for key in keys]
    await conn.execute(
        """
        INSERT INTO ledger.balances (sku, location_id, state)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
        ON CONFLICT DO NOTHING
        """,
        skus,
        locations,
        states,
    )
    rows = await conn.fetch(
        """
        SELECT b.sku, b.location_id, b.state, b.on_hand, b.version
        FROM ledger.balances b
        JOIN unnest($1::text[], $2::text[], $3::text[])
             WITH ORDINALITY AS k(sku, location_id, state, n)
          USING (sku, location_id, state)
        ORDER BY k.n
        FOR UPDATE OF b
        """,
        skus,
        locations,
        states,
    )
    return {
        StockKey(row["sku"], row["location_id"], StockState(row["state"])): Balance(
            row["on_hand"], row["version"]
        )
        for row in rows
    }


async def record(
    conn: Connection,
    movements: Sequence[tuple[PostMovement, list[PostingDraft]]],
    transfers: Sequence[TransferLine],
) -> list[RecordedMovement]:
    """Insert movements and postings, and update balances and transfers.

    Movements, postings and balances are written by one statement (one round
    trip) with one reading of the clock, taken now that the rows are locked, so
    recorded_at never goes backwards for a balance.
    """
    movement_ids = [str(uuid.uuid4()) for _ in movements]
    described = [describe(movement) for movement, _ in movements]
    flat = [
        (movement_id, draft)
        for movement_id, (_, drafts) in zip(movement_ids, movements, strict=True)
        for draft in drafts
    ]
    # The last posting of each key carries its new balance.
    final: dict[StockKey, PostingDraft] = {d.stock: d for _, d in flat}
    sequences = await conn.fetch(
        """
        WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
        moved AS (
            INSERT INTO ledger.movements (
                movement_id, device_id, device_sequence, content_digest, kind, sku,
                location_id, reason_code, transfer_id, counterpart_location_id, reference,
                counted_quantity, occurred_at, recorded_at)
            SELECT m.id, m.device, m.seq, m.digest, m.kind, m.sku, m.location, m.reason,
                   m.transfer, m.counterpart, m.reference, m.counted,
                   coalesce(m.occurred, clock.now), clock.now
            FROM clock, unnest(
                $1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[],
                $13::timestamptz[])
              AS m(id, device, seq, digest, kind, sku, location, reason, transfer,
                   counterpart, reference, counted, occurred)
        ),
        balanced AS (
            UPDATE ledger.balances b
            SET on_hand = k.on_hand, version = k.version, updated_at = clock.now
            FROM clock, unnest($21::text[], $22::text[], $23::text[], $24::bigint[],
                               $25::bigint[]) AS k(sku, location_id, state, on_hand, version)
            WHERE (b.sku, b.location_id, b.state) = (k.sku, k.location_id, k.state)
        )
        INSERT INTO ledger.postings (
            movement_id, sku, location_id, state, quantity_delta, on_hand_after,
            balance_version, recorded_at)
        SELECT p.*, clock.now
        FROM clock, unnest($14::uuid[], $15::text[], $16::text[], $17::text[],
                           $18::bigint[], $19::bigint[], $20::bigint[]) AS p
        RETURNING sku, location_id, state, balance_version, ledger_sequence, recorded_at
        """,
        movement_ids,
        [m.key.device_id for m, _ in movements],
        [m.key.sequence for m, _ in movements],
        [m.content_digest() for m, _ in movements],
        [m.kind.value for m, _ in movements],
        [m.sku for m, _ in movements],
        [m.location_id for m, _ in movements],
        [d["reason_code"] for d in described],
        [d["transfer_id"] for d in described],
        [d["counterpart_location_id"] for d in described],
        [d["reference"] for d in described],
        [d["counted_quantity"] for d in described],
        [m.occurred_at for m, _ in movements],
        [movement_id for movement_id, _ in flat],
        [d.stock.sku for _, d in flat],
        [d.stock.location_id for _, d in flat],
        [d.stock.state.value for _, d in flat],
        [d.quantity_delta for _, d in flat],
        [d.on_hand_after for _, d in flat],
        [d.balance_version for _, d in flat],
        [key.sku for key in final],
        [key.location_id for key in final],
        [key.state.value for key in final],
        [d.on_hand_after for d in final.values()],
        [d.balance_version for d in final.values()],
    )
    recorded_at: datetime = sequences[0]["recorded_at"]
    if transfers:
        await conn.execute(
            """
            INSERT INTO ledger.transfers AS t (
                transfer_id, sku, source_location_id, destination_location_id,
                quantity_sent, quantity_received)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                 $5::bigint[], $6::bigint[])
            ON CONFLICT (transfer_id, sku) DO UPDATE
            SET quantity_sent = excluded.quantity_sent,
                quantity_received = excluded.quantity_received,
                updated_at = now()
            """,
            [t.transfer_id for t in transfers],
            [t.sku for t in transfers],
            [t.source_location_id for t in transfers],
            [t.destination_location_id for t in transfers],
            [t.quantity_sent for t in transfers],
            [t.quantity_received for t in transfers],
        )
    # (key, balance version) is unique, so it maps each posting to its sequence number.
    sequence_of = {
        (row["sku"], row["location_id"], row["state"], row["balance_version"]): row[
            "ledger_sequence"
        ]
        for row in sequences
    }
    postings_by_movement: dict[str, list[Posting]] = {}
    for movement_id, draft in flat:
        stock = draft.stock
        postings_by_movement.setdefault(movement_id, []).append(
            Posting(
                stock,
                draft.quantity_delta,
                draft.on_hand_after,
                draft.balance_version,
                sequence_of[
                    (stock.sku, stock.location_id, stock.state.value, draft.balance_version)
                ],
            )
        )
    return [
        RecordedMovement(
            movement_id=movement_id,
            key=movement.key,
            kind=movement.kind,
            sku=movement.sku,
            location_id=movement.location_id,
            postings=tuple(postings_by_movement[movement_id]),
            occurred_at=movement.occurred_at or recorded_at,
            recorded_at=recorded_at,
            reason_code=str(columns["reason_code"]),
            transfer_id=str(columns["transfer_id"]),
            counterpart_location_id=str(columns["counterpart_location_id"]),
            reference=str(columns["reference"]),
            counted_quantity=int(columns["counted_quantity"]),
        )
        for movement_id, (movement, _), columns in zip(
            movement_ids, movements, described, strict=True
        )
    ]


async def load_movements(
    conn: Connection, movement_ids: Sequence[str]
) -> dict[str, RecordedMovement]:
    """Recorded movements by id, with their postings."""
    if not movement_ids:
        return {}
    rows = await conn.fetch(
        "SELECT * FROM ledger.movements WHERE movement_id = ANY($1::uuid[])", list(movement_ids)
    )
    posting_rows = await conn.fetch(
        "SELECT * FROM ledger.postings WHERE movement_id = ANY($1::uuid[]) "
        "ORDER BY ledger_sequence",
        list(movement_ids),
    )
    postings: dict[str, list[Posting]] = {}
    for row in posting_rows:
        postings.setdefault(str(row["movement_id"]), []).append(_posting(row))
    return {
        str(row["movement_id"]): _movement(
            row, tuple(postings.get(str(row["movement_id"]), ())), row["sku"], row["location_id"]
        )
        for row in rows
    }


def _movement(
    row: asyncpg.Record, postings: tuple[Posting, ...], sku: str, location_id: str
) -> RecordedMovement:
    # ``sku`` and ``location_id`` are passed in because a history row joins the
    # movement to one of its postings, whose own columns carry the same names.
    return RecordedMovement(
        movement_id=str(row["movement_id"]),
        key=IdempotencyKey(row["device_id"], row["device_sequence"]),
        kind=MovementKind(row["kind"]),
        sku=sku,
        location_id=location_id,
        postings=postings,
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        reason_code=row["reason_code"],
        transfer_id=row["transfer_id"],
        counterpart_location_id=row["counterpart_location_id"],
        reference=row["reference"],
        counted_quantity=row["counted_quantity"],
    )


def _posting(row: asyncpg.Record) -> Posting:
    return Posting(
        StockKey(row["sku"], row["location_id"], StockState(row["state"])),
        row["quantity_delta"],
        row["on_hand_after"],
        row["balance_version"],
        row["ledger_sequence"],
    )


# ---------------------------------------------------------------------------
# Queries.


async def stock_levels(
    conn: Connection,
    *,
    skus: Sequence[str],
    locations: Sequence[str],
    states: Sequence[StockState],
    as_of: datetime | None,
    include_zero: bool,
) -> list[tuple[StockKey, int, int, datetime]]:
    """On-hand per key now (from balances) or as of a past time (from postings)."""
    filters = """
        ($1::text[] = '{}' OR sku = ANY($1))
        AND ($2::text[] = '{}' OR location_id = ANY($2))
        AND ($3::text[] = '{}' OR state = ANY($3))
    """
    args: list[object] = [list(skus), list(locations), [s.value for s in states]]
    if as_of is None:
        sql = f"""
            SELECT sku, location_id, state, on_hand, version, updated_at
            FROM ledger.balances WHERE version > 0 AND {filters}
            ORDER BY sku, location_id, state
        """
    else:
        # The running balance of the last posting at or before as_of is the answer.
        sql = f"""
            SELECT DISTINCT ON (sku, location_id, state)
                   sku, location_id, state, on_hand_after AS on_hand,
                   balance_version AS version, recorded_at AS updated_at
            FROM ledger.postings WHERE recorded_at <= $4 AND {filters}
            ORDER BY sku, location_id, state, balance_version DESC
        """
        args.append(as_of)
    rows = await conn.fetch(sql, *args)
    return [
        (
            StockKey(row["sku"], row["location_id"], StockState(row["state"])),
            row["on_hand"],
            row["version"],
            row["updated_at"],
        )
        for row in rows
        if include_zero or row["on_hand"] != 0
    ]


async def history(
    conn: Connection,
    *,
    sku: str,
    location_id: str,
    recorded_from: datetime | None,
    recorded_to: datetime | None,
    after_sequence: int,
    limit: int,
) -> list[tuple[Posting, RecordedMovement]]:
    """Postings in ledger order after ``after_sequence``, with their movements."""
    rows = await conn.fetch(
        """
        SELECT p.*, m.device_id, m.device_sequence, m.kind, m.occurred_at,
               m.reason_code, m.reference, m.transfer_id, m.counterpart_location_id,
               m.counted_quantity, m.sku AS m_sku, m.location_id AS m_location_id
        FROM ledger.postings p JOIN ledger.movements m USING (movement_id)
        WHERE ($1 = '' OR p.sku = $1) AND ($2 = '' OR p.location_id = $2)
          AND ($3::timestamptz IS NULL OR p.recorded_at >= $3)
          AND ($4::timestamptz IS NULL OR p.recorded_at < $4)
          AND p.ledger_sequence > $5
        ORDER BY p.ledger_sequence
        LIMIT $6
        """,
        sku,
        location_id,
        recorded_from,
        recorded_to,
        after_sequence,
        limit,
    )
    result = []
    for row in rows:
        posting = _posting(row)
        result.append((posting, _movement(row, (posting,), row["m_sku"], row["m_location_id"])))
    return result


# ---------------------------------------------------------------------------
# Master data.


async def upsert_locations(conn: Connection, locations: Sequence[Location]) -> None:
    """Create or replace locations."""
    await conn.executemany(
        """
        INSERT INTO ledger.locations (location_id, kind, name, city, latitude, longitude,
            ship_from_store, click_and_collect, accepts_returns, daily_capacity, active)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (location_id) DO UPDATE SET
            kind = excluded.kind, name = excluded.name, city = excluded.city,
            latitude = excluded.latitude, longitude = excluded.longitude,
            ship_from_store = excluded.ship_from_store,
            click_and_collect = excluded.click_and_collect,
            accepts_returns = excluded.accepts_returns,
            daily_capacity = excluded.daily_capacity, active = excluded.active,
            updated_at = now()
        """,
        [
            (
                loc.location_id,
                loc.kind.value if loc.kind else None,
                loc.name,
                loc.city,
                loc.latitude,
                loc.longitude,
                loc.ship_from_store,
                loc.click_and_collect,
                loc.accepts_returns,
                loc.daily_capacity,
                loc.active,
            )
            for loc in locations
        ],
    )


async def list_locations(conn: Connection, kind: LocationKind | None) -> list[Location]:
    """All locations, optionally of one kind, in id order."""
    rows = await conn.fetch(
        "SELECT * FROM ledger.locations WHERE $1::text IS NULL OR kind = $1 ORDER BY location_id",
        kind.value if kind else None,
    )
    return [
        Location(
            location_id=row["location_id"],
            kind=LocationKind(row["kind"]),
            name=row["name"],
            city=row["city"],
            latitude=row["latitude"],
            longitude=row["longitude"],
            ship_from_store=row["ship_from_store"],
            click_and_collect=row["click_and_collect"],
            accepts_returns=row["accepts_returns"],
            daily_capacity=row["daily_capacity"],
            active=row["active"],
        )
        for row in rows
    ]


async def upsert_skus(conn: Connection, skus: Sequence[Sku]) -> None:
    """Create or replace SKUs."""
    await conn.executemany(
        """
        INSERT INTO ledger.skus (sku, product_id, name, colour, size, barcode)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (sku) DO UPDATE SET
            product_id = excluded.product_id, name = excluded.name, colour = excluded.colour,
            size = excluded.size, barcode = excluded.barcode, updated_at = now()
        """,
        [(s.sku, s.product_id, s.name, s.colour, s.size, s.barcode) for s in skus],
    )


async def list_skus(conn: Connection, *, product_id: str, after: str, limit: int) -> list[Sku]:
    """SKUs in id order after ``after``."""
    rows = await conn.fetch(
        "SELECT * FROM ledger.skus WHERE ($1 = '' OR product_id = $1) AND sku > $2 "
        "ORDER BY sku LIMIT $3",
        product_id,
        after,
        limit,
    )
    return [
        Sku(row["sku"], row["product_id"], row["name"], row["colour"], row["size"], row["barcode"])
        for row in rows
    ]
