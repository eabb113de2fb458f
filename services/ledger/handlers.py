"""Command and query handlers of the stock ledger: one transaction per command.

Each handler validates the whole request first (nothing is read or written for
a bad request), then opens a unit of work, loads and locks what it needs, asks
the domain for the outcome, writes it together with its events (outbox), and
commits.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TypeVar

from omnistock.db import Connection, Pool, unit_of_work
from omnistock.errors import AlreadyExists, DomainError, FieldViolation, InvalidArgument
from omnistock.idempotency import (
    once_in_transaction,
    require_request_id,
)
from omnistock.messaging import outbox
from omnistock.messaging.envelope import OutgoingEvent
from omnistock.validation import check_id
from services.ledger import convert, domain, storage
from services.ledger import metrics as ledger_metrics

T = TypeVar("T", domain.Location, domain.Sku)

SCHEMA = "ledger"
PRODUCER = "ledger"
STOCK_MOVED_SUBJECT = "omni.ledger.stock.moved"
LOCATION_UPSERTED_SUBJECT = "omni.ledger.location.upserted"
SKU_UPSERTED_SUBJECT = "omni.ledger.sku.upserted"
# Two scanners' first posts of one key meet on this constraint (see migrations).
MOVEMENT_KEY_CONSTRAINT = "movements_idempotency_key"
MAX_FILTER_VALUES = 1000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


@dataclass
class LedgerHandlers:
    """The ledger's use cases over one connection pool."""

    pool: Pool

    # -- commands ---------------------------------------------------------

    async def post_movements(
        self, movements: Sequence[domain.PostMovement]
    ) -> list[domain.PostedMovement]:
        """Record a batch of movements exactly once each, all or nothing."""
        ledger_metrics.BATCH_SIZE.observe(len(movements))
        try:
            validated = domain.validate_batch(movements)
            results = await unit_of_work(
                self.pool,
                lambda conn: self._post(conn, validated),
                retry_unique={MOVEMENT_KEY_CONSTRAINT},
            )
        except DomainError as error:
            ledger_metrics.REJECTED_BATCHES.labels(error.reason).inc()
            raise
        _count_recorded(results)
        return results

    async def post_movements_in(
        self, conn: Connection, movements: Sequence[domain.PostMovement]
    ) -> list[domain.PostedMovement]:
        """Record a batch like :meth:`post_movements`, in the caller's transaction.

        For event consumers: the movements commit (or roll back) together with
        whatever else the caller writes, such as its inbox record. Errors are
        raised for the caller to handle; the batch-size and rejected-batch
        metrics belong to PostMovements and are not touched here.
        """
        results = await self._post(conn, domain.validate_batch(movements))
        # Counted before the caller commits: a commit that fails and is retried
        # counts its movements twice, which the metrics can bear.
        _count_recorded(results)
        return results

    async def record_return(
        self, conn: Connection, routed: domain.RoutedReturn
    ) -> list[domain.PostedMovement]:
        """Post the movements of a return order routing routed, in one batch on ``conn``."""
        return await self.post_movements_in(conn, domain.return_movements(routed))

    async def record_fulfilment(
        self, conn: Connection, fact: domain.FulfilmentFact
    ) -> list[domain.PostedMovement]:
        """Post the movements of a fulfilment fact, in one batch on ``conn``."""
        return await self.post_movements_in(conn, domain.fulfilment_movements(fact))

    async def _post(
        self, conn: Connection, movements: list[domain.PostMovement]
    ) -> list[domain.PostedMovement]:
        lookup = await storage.look_up(
            conn,
            {m.sku for m in movements},
            {key.location_id for m in movements for key in m.stock_keys},
            [m.key for m in movements],
        )
        domain.check_references(movements, lookup.known_skus, lookup.known_locations)
        existing = lookup.existing
        _refuse_reused_keys(movements, existing)

        fresh = [(i, m) for i, m in enumerate(movements) if m.key not in existing]
        recorded: dict[domain.IdempotencyKey, domain.RecordedMovement] = {}
        if fresh:
            new = [m for _, m in fresh]
            # One global order for every writer: transfer lines first, then balances.
            transfers = await storage.lock_transfers(conn, domain.transfer_keys(new))
            balances = await storage.lock_balances(conn, domain.lock_order(new))
            positions = domain.Positions(balances=balances, transfers=transfers)
            drafts = [(m, positions.apply(m, index)) for index, m in fresh]
            touched = [positions.transfers[k] for k in sorted(positions.touched_transfers)]
            for stored in await storage.record(conn, drafts, touched):
                recorded[stored.key] = stored
            await outbox.append(
                conn,
                SCHEMA,
                PRODUCER,
                [
                    OutgoingEvent(
                        subject=STOCK_MOVED_SUBJECT,
                        payload=convert.stock_moved(movement),
                        ordering_key=f"{movement.sku}@{movement.location_id}",
                        occurred_at=movement.recorded_at,
                    )
                    for movement in recorded.values()
                ],
            )
        replayed = await storage.load_movements(conn, [mid for mid, _ in existing.values()])
        results = []
        for movement in movements:
            if movement.key in recorded:
                results.append(domain.PostedMovement(recorded[movement.key], replayed=False))
            else:
                movement_id, _ = existing[movement.key]
                results.append(domain.PostedMovement(replayed[movement_id], replayed=True))
        return results

    async def upsert_locations(
        self, request_id: str, locations: Sequence[domain.Location]
    ) -> list[domain.Location]:
        """Create or replace locations; a retry with the same request id changes nothing."""
        require_request_id(request_id)
        domain.validate_locations(locations)
        events = [
            OutgoingEvent(
                LOCATION_UPSERTED_SUBJECT, convert.location_upserted(loc), loc.location_id
            )
            for loc in locations
        ]
        await self._upsert_once(
            "UpsertLocations", request_id, locations, storage.upsert_locations, events
        )
        return list(locations)

    async def upsert_skus(self, request_id: str, skus: Sequence[domain.Sku]) -> list[domain.Sku]:
        """Create or replace SKUs; a retry with the same request id changes nothing."""
        require_request_id(request_id)
        domain.validate_skus(skus)
        events = [
            OutgoingEvent(SKU_UPSERTED_SUBJECT, convert.sku_upserted(sku), sku.sku) for sku in skus
        ]
        await self._upsert_once("UpsertSkus", request_id, skus, storage.upsert_skus, events)
        return list(skus)

    async def _upsert_once(
        self,
        method: str,
        request_id: str,
        items: Sequence[T],
        write: Callable[[Connection, Sequence[T]], Awaitable[None]],
        events: list[OutgoingEvent],
    ) -> None:
        # The answer of an upsert is its own request, so only the request's digest
        # is kept: a retry with the same content is answered with that content.
        content = json.dumps([asdict(item) for item in items], sort_keys=True).encode()

        async def execute(conn: Connection) -> None:
            await write(conn, items)
            await outbox.append(conn, SCHEMA, PRODUCER, events)

        await once_in_transaction(
            self.pool,
            schema=SCHEMA,
            method=method,
            request_id=request_id,
            content=content,
            execute=execute,
            encode=lambda _: b"",
            decode=lambda _: None,
        )

    # -- queries ----------------------------------------------------------

    async def stock_levels(
        self,
        *,
        skus: Sequence[str],
        locations: Sequence[str],
        states: Sequence[domain.StockState],
        as_of: datetime | None,
        include_zero: bool,
    ) -> list[tuple[domain.StockKey, int, int, datetime]]:
        """On-hand now or at a past time."""
        problems = []
        if not skus and not locations:
            problems.append(
                FieldViolation(
                    "skus", "give skus, location_ids or both; the whole network is too much"
                )
            )
        for name, values in (("skus", skus), ("location_ids", locations)):
            for i, value in enumerate(values[:MAX_FILTER_VALUES]):
                problems += check_id(value, f"{name}[{i}]", "the identifier")
        if as_of is not None and as_of > datetime.now(UTC):
            problems.append(FieldViolation("as_of", "is in the future; the ledger cannot know it"))
        if len(skus) > MAX_FILTER_VALUES:
            problems.append(FieldViolation("skus", f"at most {MAX_FILTER_VALUES} SKUs per call"))
        if len(locations) > MAX_FILTER_VALUES:
            problems.append(
                FieldViolation("location_ids", f"at most {MAX_FILTER_VALUES} locations per call")
            )
        if problems:
            raise InvalidArgument(problems)
        async with self.pool.acquire() as conn:
            return await storage.stock_levels(
                conn,
                skus=skus,
                locations=locations,
                states=states,
                as_of=as_of,
                include_zero=include_zero,
            )

    async def history(
        self,
        *,
        sku: str,
        location_id: str,
        recorded_from: datetime | None,
        recorded_to: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[tuple[domain.Posting, domain.RecordedMovement]], str]:
        """One page of postings with running balances, and the next page's token."""
        problems = []
        if not sku and not location_id:
            problems.append(FieldViolation("sku", "give a sku, a location_id or both"))
        if sku:
            problems += check_id(sku, "sku", "the sku")
        if location_id:
            problems += check_id(location_id, "location_id", "the location id")
        problems += _check_page_size(page_size)
        after = _sequence_token(page_token) if page_token else 0
        if after is None:
            problems.append(FieldViolation("page_token", "is not a token this service issued"))
        if recorded_from and recorded_to and recorded_to <= recorded_from:
            problems.append(FieldViolation("recorded_to", "must be after recorded_from"))
        if problems:
            raise InvalidArgument(problems)
        limit = page_size or DEFAULT_PAGE_SIZE
        async with self.pool.acquire() as conn:
            rows = await storage.history(
                conn,
                sku=sku,
                location_id=location_id,
                recorded_from=recorded_from,
                recorded_to=recorded_to,
                after_sequence=after or 0,
                limit=limit + 1,
            )
        next_token = f"p{rows[limit - 1][0].ledger_sequence:x}" if len(rows) > limit else ""
        return rows[:limit], next_token

    async def locations(self, kind: domain.LocationKind | None) -> list[domain.Location]:
        """All locations, optionally of one kind."""
        async with self.pool.acquire() as conn:
            return await storage.list_locations(conn, kind)

    async def skus(
        self, *, product_id: str, page_size: int, page_token: str
    ) -> tuple[list[domain.Sku], str]:
        """One page of SKUs and the next page's token."""
        problems = _check_page_size(page_size)
        if product_id:
            problems += check_id(product_id, "product_id", "the product id")
        if page_token:
            problems += check_id(page_token, "page_token", "a token this service issued")
        if problems:
            raise InvalidArgument(problems)
        limit = page_size or DEFAULT_PAGE_SIZE
        async with self.pool.acquire() as conn:
            rows = await storage.list_skus(
                conn, product_id=product_id, after=page_token, limit=limit + 1
            )
        next_token = rows[limit - 1].sku if len(rows) > limit else ""
        return rows[:limit], next_token


def _count_recorded(results: Sequence[domain.PostedMovement]) -> None:
    for result in results:
        if result.replayed:
            ledger_metrics.REPLAYED.inc()
            continue
        kind = result.movement.kind.value
        ledger_metrics.MOVEMENTS.labels(kind).inc()
        ledger_metrics.MOVEMENT_UNITS.labels(kind).inc(
            abs(result.movement.postings[0].quantity_delta)
        )


def _check_page_size(page_size: int) -> list[FieldViolation]:
    if 0 <= page_size <= MAX_PAGE_SIZE:
        return []
    return [FieldViolation("page_size", f"must be 0 to {MAX_PAGE_SIZE}")]


def _sequence_token(token: str) -> int | None:
    """The ledger sequence in a ListMovements page token, or None if it is not one."""
    if not (token.startswith("p") and 2 <= len(token) <= 17):
        return None
    try:
        sequence = int(token[1:], 16)
    except ValueError:
        return None
    return sequence if 0 < sequence < 2**63 else None


def _refuse_reused_keys(
    movements: Sequence[domain.PostMovement],
    existing: dict[domain.IdempotencyKey, tuple[str, str]],
) -> None:
    conflicts = [
        (index, m)
        for index, m in enumerate(movements)
        if m.key in existing and existing[m.key][1] != m.content_digest()
    ]
    if conflicts:
        index, first = conflicts[0]
        raise AlreadyExists(
            "IDEMPOTENCY_KEY_REUSED",
            f"movements[{index}]: key {first.key} was already recorded for a different movement "
            f"({len(conflicts)} such key(s) in the batch). A device must not reuse a sequence "
            "number; nothing was recorded.",
            {
                "index": str(index),
                "device_id": first.key.device_id,
                "sequence": str(first.key.sequence),
                "conflicts": str(len(conflicts)),
            },
        )
