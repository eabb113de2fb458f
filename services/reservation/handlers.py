"""Command and query handlers of the reservation service: one transaction per command.

Reserve runs through a group committer: the holds queued while one
transaction runs are placed together in the next, which locks each hot
(sku, location) row once for many calls (see ``omnistock.group_commit``).
Every change of stock or holds writes its events, ``AvailabilityChanged``
included, to the outbox in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.reservation.v1 import events_pb2
from omnistock.db import Connection, Pool, unit_of_work
from omnistock.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from omnistock.group_commit import GroupCommitter
from omnistock.grpc.client import ChannelFactory
from omnistock.idempotency import (
    IDEMPOTENCY_KEY_CONSTRAINT,
    digest,
    once_in_transaction,
    require_request_id,
    reused,
)
from omnistock.logs import current_correlation_id, get_logger
from omnistock.messaging import outbox
from omnistock.messaging.envelope import OutgoingEvent
from omnistock.validation import check_id, check_reason
from services.reservation import convert, domain, storage
from services.reservation import metrics as m
from services.reservation.domain import LineStatus, StockKey, StockRow

log = get_logger(__name__)
T = TypeVar("T")

SCHEMA = "reservation"
PRODUCER = "reservation"
SUBJECT = "omni.reservation"
AVAILABILITY_SUBJECT = f"{SUBJECT}.availability.changed"
RULES_SUBJECT = f"{SUBJECT}.rules.changed"
# Movements that lose stock; a hold they leave uncovered is short at once. A
# shipment or transfer out uncovers holds only until fulfilment's event
# consumes them, so those get a grace period (see ``flag_overdue_shortages``).
LOSS_KINDS = frozenset({"adjustment", "cycle_count", "state_change"})
# Movements that take a fulfilment's goods away (matched with its consumption).
DEPARTURE_KINDS = frozenset({"shipment", "transfer_out"})
# How long a transfer's receipt waits for its shipment's consumption to be seen:
# within the consumer's retries before dead-lettering (about 7 s at 5 deliveries),
# and far beyond the milliseconds between two replicas handling the two events.
ARRIVAL_WAITS_FOR_SHIPMENT = timedelta(seconds=5)


class ShipmentNotSeenYet(Exception):
    """A transfer's receipt came before its shipment was handled; retry the receipt."""

    def __init__(self, fulfilment_id: str) -> None:
        super().__init__(f"the shipment of transfer {fulfilment_id} is not handled yet")


# Namespace of the ids of holds on goods a transfer brought to a pickup store.
TRANSFER_ARRIVALS = uuid.UUID("117f62d7-1870-4617-a69d-3c714449004b")


@dataclass(frozen=True)
class Posting:
    """One change of sellable on-hand, as the ledger's StockMoved reports it."""

    sku: str
    location_id: str
    on_hand_after: int
    balance_version: int
    quantity_delta: int = 0


@dataclass(frozen=True)
class StockMovedFacts:
    """What the projection needs of a StockMoved event."""

    kind: str
    recorded_at: datetime
    postings: tuple[Posting, ...]
    # The fulfilment the ledger posted the movement for (None: a scanner's).
    fulfilment_id: str | None = None


@dataclass(frozen=True)
class ReserveResult:
    """A hold as placed, or as first placed when the request was a retry."""

    reservation: domain.Reservation
    replayed: bool


# A Reserve waiting for its batch, with the correlation id of its caller.
Queued = tuple[domain.Reserve, str | None]


@dataclass(frozen=True)
class SkuFigures:
    """GetAvailability's answer for one SKU."""

    sku: str
    network: domain.Figure
    locations: list[domain.Figure]


class RulesCache:
    """The rules, reloaded only when their version row changed (one cheap read)."""

    def __init__(self) -> None:
        self._version = -1
        self._rules = domain.Rules()

    async def get(self, conn: Connection, version: int | None = None) -> domain.Rules:
        """The current rules, as of the caller's transaction (``version`` if already read)."""
        if version is None:
            version = await storage.rules_version(conn)
        if version != self._version:
            self._rules = await storage.load_rules(conn)
            self._version = version
        return self._rules


@dataclass
class Changes:
    """Stock rows a transaction changed, to announce as AvailabilityChanged."""

    rows: dict[StockKey, StockRow] = field(default_factory=dict)
    movement_recorded_at: datetime | None = None

    def add(self, row: StockRow) -> None:
        """Remember ``row`` as changed."""
        self.rows[row.key] = row


class ReservationHandlers:
    """The reservation service's use cases over one connection pool."""

    def __init__(
        self,
        pool: Pool,
        *,
        ledger_target: str,
        channels: ChannelFactory,
        short_grace: timedelta = timedelta(seconds=60),
        max_batch: int = 128,
        batch_concurrency: int = 2,
    ) -> None:
        self.pool = pool
        self._ledger_target = ledger_target
        self._channels = channels
        self._short_grace = short_grace
        self._rules = RulesCache()
        # Each queued hold carries its caller's correlation id: the batch's
        # transaction runs outside the callers' contexts.
        self.committer: GroupCommitter[Queued, ReserveResult] = GroupCommitter(
            "reservation-reserve",
            self._reserve_batch,
            max_batch=max_batch,
            concurrency=batch_concurrency,
        )

    # -- holds ----------------------------------------------------------------

    async def reserve(self, command: domain.Reserve) -> ReserveResult:
        """Hold every line or none; a retry with the same request id gets the first answer."""
        try:
            require_request_id(command.request_id)
            domain.validate_reserve(command)
            result = await self.committer.submit((command, current_correlation_id()))
        except domain.InsufficientStock:
            m.RESERVE_OUTCOMES.labels("insufficient").inc()
            raise
        except (AlreadyExists, Aborted):
            m.RESERVE_OUTCOMES.labels("conflict").inc()
            raise
        except DomainError:
            m.RESERVE_OUTCOMES.labels("invalid").inc()
            raise
        if result.replayed:
            m.RESERVE_OUTCOMES.labels("replayed").inc()
        else:
            m.RESERVE_OUTCOMES.labels("ok").inc()
            m.RESERVED_UNITS.inc(sum(line.quantity for line in result.reservation.lines))
        return result

    async def _reserve_batch(self, queued: list[Queued]) -> list[ReserveResult | BaseException]:
        return await unit_of_work(
            self.pool,
            lambda conn: self._place_all(conn, queued),
            retry_unique={IDEMPOTENCY_KEY_CONSTRAINT},
        )

    async def _place_all(
        self, conn: Connection, queued: list[Queued]
    ) -> list[ReserveResult | BaseException]:
        commands = [command for command, _ in queued]
        # Five round trips whatever the batch size: locks, context, stock, writes, outbox.
        skus = {line.sku for c in commands for line in c.lines}
        # The SKU locks serialise every writer of these SKUs, so what is read after
        # them is current and stays so until commit: the stock rows, and the stored
        # answers — a retry racing its first attempt (same request, same SKUs) waits
        # here for that attempt to commit and then replays its answer.
        versions = await storage.lock_and_bump_skus(conn, skus)
        rules_version, answers = await storage.reserve_context(
            conn, [c.request_id for c in commands]
        )
        rules = await self._rules.get(conn, rules_version)
        every_row = await storage.stock_of_skus(conn, skus)
        now = datetime.now(UTC)
        outcomes: list[ReserveResult | BaseException] = []
        placed: list[domain.Reservation] = []
        created: list[OutgoingEvent] = []
        new_answers: list[tuple[str, bytes, bytes]] = []
        changes = Changes()
        for command, correlation_id in queued:
            request_digest = digest(command.content())
            if command.request_id in answers:
                stored_digest, answer = answers[command.request_id]
                outcomes.append(
                    ReserveResult(convert.decode_reservation(answer), replayed=True)
                    if stored_digest == request_digest
                    else reused("Reserve", command.request_id)
                )
                continue
            try:
                domain.check_references(command.lines, versions, rules.locations)
                reservation = domain.place(
                    command, every_row, rules, reservation_id=str(uuid.uuid4()), now=now
                )
            except DomainError as error:
                outcomes.append(error)
                continue
            # One wire form serves as the stored answer and as the event's payload.
            wire_form = convert.reservation_out(reservation)
            answer = wire_form.SerializeToString()
            answers[command.request_id] = (request_digest, answer)
            new_answers.append((command.request_id, request_digest, answer))
            placed.append(reservation)
            created.append(
                replace(
                    _outgoing(
                        "reservation.created",
                        events_pb2.ReservationCreated(reservation=wire_form),
                        reservation,
                    ),
                    correlation_id=correlation_id,
                )
            )
            outcomes.append(ReserveResult(reservation, replayed=False))
            for line in command.lines:
                changes.add(every_row[line.key])
        if placed:
            await storage.write_holds(conn, placed, changes.rows.values(), new_answers)
            figures = self._figures(changes, rules, versions, every_row)
            await outbox.append(conn, SCHEMA, PRODUCER, created + figures)
        return outcomes

    async def extend(
        self, request_id: str, reservation_id: str, ttl: timedelta | None
    ) -> domain.Reservation:
        """Give an active cart hold a new time to live, counted from now."""
        require_request_id(request_id)
        problems = _check_reservation_id(reservation_id) + domain.check_ttl(ttl, "ttl")
        if problems:
            raise InvalidArgument(problems)

        async def execute(conn: Connection) -> domain.Reservation:
            reservation = await self._locked(conn, reservation_id)
            now = datetime.now(UTC)
            _require_live_cart(reservation, now, "extended")
            rules = await self._rules.get(conn)
            chosen = ttl or rules.channel(reservation.channel).cart_ttl
            extended = domain.replace_expiry(reservation, now + chosen, now)
            await storage.save_reservations(conn, [extended])
            await outbox.append(
                conn,
                SCHEMA,
                PRODUCER,
                [_event("reservation.extended", events_pb2.ReservationExtended, extended)],
            )
            return extended

        content = f"{uuid.UUID(reservation_id)}|{ttl.total_seconds() if ttl else ''}".encode()
        return await self._once_reservation("ExtendReservation", request_id, content, execute)

    async def release(
        self, request_id: str, reservation_id: str, line_numbers: Sequence[int], reason_code: str
    ) -> domain.Reservation:
        """Let go of some lines or of every active line."""
        require_request_id(request_id)
        problems = _check_reservation_id(reservation_id)
        problems += check_reason(reason_code, "reason_code", required=False)
        if len(line_numbers) > domain.MAX_LINES:
            problems.append(FieldViolation("line_numbers", f"at most {domain.MAX_LINES}"))
        if problems:
            raise InvalidArgument(problems)

        async def execute(conn: Connection) -> domain.Reservation:
            reservation, rows = await self._lock_with_stock(conn, reservation_id)
            lines = domain.check_release(reservation, line_numbers, reason_code)
            now = datetime.now(UTC)
            released, freed = domain.end_lines(reservation, lines, LineStatus.RELEASED, now)
            changes = _free(rows, freed)
            await storage.save_reservations(conn, [released])
            await storage.save_stock(conn, changes.rows.values())
            event = events_pb2.ReservationReleased(
                reservation=convert.reservation_out(released),
                line_numbers=[line.line_number for line in lines],
                reason_code=reason_code,
            )
            await outbox.append(
                conn,
                SCHEMA,
                PRODUCER,
                [_outgoing("reservation.released", event, released)]
                + await self._announce(conn, changes),
            )
            m.ENDED_LINES.labels("released").inc(len(lines))
            return released

        content = f"{uuid.UUID(reservation_id)}|{sorted(line_numbers)}|{reason_code}".encode()
        return await self._once_reservation("ReleaseReservation", request_id, content, execute)

    async def convert(
        self, request_id: str, reservation_id: str, reference: str
    ) -> domain.Reservation:
        """Turn an active cart hold into an order hold, keeping every unit held."""
        require_request_id(request_id)
        problems = _check_reservation_id(reservation_id)
        if reference:
            problems += check_id(reference, "reference", "the reference")
        if problems:
            raise InvalidArgument(problems)

        async def execute(conn: Connection) -> domain.Reservation:
            reservation = await self._locked(conn, reservation_id)
            now = datetime.now(UTC)
            _require_live_cart(reservation, now, "converted")
            converted = domain.to_order(reservation, reference or reservation.reference, now)
            await storage.save_reservations(conn, [converted])
            event = events_pb2.ReservationConverted(
                reservation=convert.reservation_out(converted),
                previous_reference=reservation.reference,
            )
            await outbox.append(
                conn, SCHEMA, PRODUCER, [_outgoing("reservation.converted", event, converted)]
            )
            return converted

        content = f"{uuid.UUID(reservation_id)}|{reference}".encode()
        return await self._once_reservation("ConvertReservation", request_id, content, execute)

    async def get(self, reservation_id: str) -> domain.Reservation:
        """One reservation, or NOT_FOUND."""
        problems = _check_reservation_id(reservation_id)
        if problems:
            raise InvalidArgument(problems)
        async with self.pool.acquire() as conn:
            found = await storage.load_reservations(conn, [reservation_id])
        return _found(found, reservation_id)

    async def list_by_reference(self, query: domain.ListReservations) -> list[domain.Reservation]:
        """A channel's reservations with one reference, newest first, at most 100."""
        domain.validate_list_reservations(query)
        statuses = [status for status in query.statuses if status is not None]
        async with self.pool.acquire() as conn:
            # One snapshot: a hold that changes between finding and loading it
            # cannot come back with a status the filter excluded.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                ids = await storage.reservations_by_reference(
                    conn, query.channel, query.reference, statuses, domain.MAX_LISTED_RESERVATIONS
                )
                found = await storage.load_reservations(conn, ids)
        return [found[rid] for rid in ids]

    # -- availability ---------------------------------------------------------------

    async def availability(
        self,
        channel: str,
        skus: Sequence[str],
        location_ids: Sequence[str],
        include_locations: bool,
        available_only: bool = False,
    ) -> list[SkuFigures]:
        """ATP for ``channel``: the network figure per SKU, and per location when asked."""
        check_availability_request(channel, skus, location_ids)
        async with self.pool.acquire() as conn:
            rules = await self._rules.get(conn)
            versions, rows = await storage.snapshot(conn, skus)
        return figures_for(
            rules, versions, rows, channel, skus, location_ids, include_locations, available_only
        )

    async def rules(self) -> domain.Rules:
        """The rules as they are now."""
        async with self.pool.acquire() as conn:
            return await self._rules.get(conn)

    # -- admin ----------------------------------------------------------------------

    async def set_channel_rules(
        self, request_id: str, rules: domain.ChannelRules
    ) -> domain.ChannelRules:
        """Create or replace one channel's rules."""
        require_request_id(request_id)
        domain.validate_rules(rules)

        async def execute(conn: Connection) -> domain.ChannelRules:
            known = await storage.known_locations(conn, rules.location_ids)
            unknown = [
                FieldViolation(f"rules.location_ids[{i}]", f"unknown location {loc!r}")
                for i, loc in enumerate(rules.location_ids)
                if loc not in known
            ]
            if unknown:
                raise InvalidArgument(unknown)
            await storage.save_channel_rules(conn, rules)
            changed = events_pb2.AvailabilityRulesChanged(channel=rules.channel)
            await outbox.append(
                conn, SCHEMA, PRODUCER, [OutgoingEvent(RULES_SUBJECT, changed, rules.channel)]
            )
            return rules

        # The answer is the request's own content, so only its digest is kept.
        content = repr(rules).encode()
        return await self._once(
            "SetChannelRules", request_id, content, execute, _no_answer, lambda _: rules
        )

    async def set_location_safety(self, request_id: str, location_id: str, units: int) -> int:
        """Set the units a location keeps back from every channel."""
        require_request_id(request_id)
        domain.validate_location_safety(location_id, units)

        async def execute(conn: Connection) -> int:
            if not await storage.known_locations(conn, [location_id]):
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "safety_stock.location_id", f"unknown location {location_id!r}"
                        )
                    ]
                )
            await storage.save_location_safety(conn, location_id, units)
            changed = events_pb2.AvailabilityRulesChanged(location_id=location_id)
            await outbox.append(
                conn, SCHEMA, PRODUCER, [OutgoingEvent(RULES_SUBJECT, changed, location_id)]
            )
            return units

        content = f"{location_id}|{units}".encode()
        return await self._once(
            "SetLocationSafetyStock", request_id, content, execute, _no_answer, lambda _: units
        )

    # -- reactions to events (called by the consumers in their transaction) ------

    async def apply_stock_moved(self, conn: Connection, facts: StockMovedFacts) -> None:
        """Project sellable on-hand from a ledger movement, in balance-version order."""
        if not facts.postings:
            return
        for posting in facts.postings:
            await storage.ensure_known(conn, posting.sku, posting.location_id)
        keys = {(p.sku, p.location_id) for p in facts.postings}
        await storage.lock_skus(conn, {sku for sku, _ in keys})
        locked = await storage.lock_stock(conn, keys)
        rows = {key: row for key, (row, _) in locked.items()}
        versions = {key: version for key, (_, version) in locked.items()}
        changes = Changes(movement_recorded_at=facts.recorded_at)
        resynced: set[StockKey] = set()
        lost: dict[StockKey, int] = {}
        departed: dict[StockKey, int] = {}
        for posting in facts.postings:
            key = (posting.sku, posting.location_id)
            row = rows.setdefault(key, StockRow(*key))
            before = row.on_hand
            known = versions.get(key, 0)
            if facts.fulfilment_id and facts.kind in DEPARTURE_KINDS:
                # Matched even when on-hand went past this posting already (a resync
                # after a redelivered older event): the inbox applies an event once,
                # and an unmatched departure would keep its units out of sale.
                departed[key] = departed.get(key, 0) + max(0, -posting.quantity_delta)
            if posting.balance_version <= known:
                continue  # applied before (a resync already went past it)
            if posting.balance_version == known + 1:
                row.on_hand, versions[key] = posting.on_hand_after, posting.balance_version
            else:
                row.on_hand, versions[key] = await self._ledger_level(key)
                resynced.add(key)
                m.PROJECTION_RESYNCS.inc()
                log.warning(
                    "reservation.projection_resync",
                    sku=key[0],
                    location_id=key[1],
                    expected_version=known + 1,
                    got_version=posting.balance_version,
                )
            lost[key] = lost.get(key, 0) + max(0, before - row.on_hand)
            changes.add(row)
        if facts.fulfilment_id:
            by_location: dict[str, dict[str, tuple[int, int]]] = {}
            for (sku, location_id), units in departed.items():
                by_location.setdefault(location_id, {})[sku] = (0, units)
                changes.add(rows[(sku, location_id)])
            for location_id, more in by_location.items():
                await self._track_departures(conn, facts.fulfilment_id, location_id, rows, more)
        if not changes.rows:
            return
        await storage.save_stock(conn, changes.rows.values(), versions)
        events: list[OutgoingEvent] = []
        for key, row in sorted(changes.rows.items()):
            if row.on_hand < row.committed and (facts.kind in LOSS_KINDS or key in resynced):
                # Short only what this movement lost: the rest of the gap may be a
                # departure whose hold is about to be consumed (the grace period).
                trigger = "resync" if key in resynced else "loss"
                events += await self._mark_short(conn, row, trigger, at_most=lost[key])
        events += await self._announce(conn, changes)
        await outbox.append(conn, SCHEMA, PRODUCER, events)
        m.MOVEMENT_TO_AVAILABILITY.observe(
            max(0.0, (datetime.now(UTC) - facts.recorded_at).total_seconds())
        )

    async def apply_location(self, conn: Connection, location_id: str, closed: bool) -> None:
        """Remember a location the ledger announced; closing one changes availability."""
        if await storage.upsert_location(conn, location_id, closed):
            await storage.bump_rules_version(conn)
            changed = events_pb2.AvailabilityRulesChanged(location_id=location_id)
            await outbox.append(
                conn, SCHEMA, PRODUCER, [OutgoingEvent(RULES_SUBJECT, changed, location_id)]
            )

    async def apply_sku(self, conn: Connection, sku: str) -> None:
        """Remember a SKU the ledger announced."""
        await storage.upsert_sku(conn, sku)

    async def consume_for_fulfilment(
        self,
        conn: Connection,
        *,
        fulfilment_id: str,
        order_id: str,
        location_id: str,
        lines: Sequence[tuple[str, int]],
    ) -> None:
        """Goods left (shipped or collected): use the order holds behind them.

        The units used stay counted against availability as departing until
        the ledger's movement for this fulfilment is projected (it may already
        have been: then nothing is departing).
        """
        used_by_line: dict[tuple[str, int], int] = {}
        used: dict[str, int] = {}

        def consume_all(
            held: dict[str, domain.Reservation], rows: dict[StockKey, StockRow], now: datetime
        ) -> list[tuple[domain.Reservation, list[domain.Line]]]:
            changed, unheld = _take_units(
                held, rows, location_id, lines, now, domain.consume, used_by_line
            )
            for sku, quantity in lines:
                used[sku] = used.get(sku, 0) + quantity
            for sku, units in unheld.items():
                used[sku] -= units
                log.warning(
                    "reservation.consumed_more_than_held",
                    fulfilment_id=fulfilment_id,
                    sku=sku,
                    unheld=units,
                )
            return changed

        async def count_departing(rows: dict[StockKey, StockRow]) -> None:
            await self._track_departures(
                conn, fulfilment_id, location_id, rows, {sku: (n, 0) for sku, n in used.items()}
            )

        consumed_holds = await self._change_order_holds(
            conn, order_id, location_id, consume_all, before_save=count_departing
        )
        for reservation, changed in consumed_holds:
            for line in changed:
                if line.status is LineStatus.CONSUMED:
                    m.ENDED_LINES.labels("consumed").inc()
                await storage.record_consumption(
                    conn, fulfilment_id, reservation.reservation_id, line.line_number,
                    used_by_line[(reservation.reservation_id, line.line_number)],
                )  # fmt: skip
            event = events_pb2.ReservationConsumed(
                reservation=convert.reservation_out(reservation), fulfilment_id=fulfilment_id
            )
            await outbox.append(
                conn, SCHEMA, PRODUCER, [_outgoing("reservation.consumed", event, reservation)]
            )

    async def release_short_picked(
        self,
        conn: Connection,
        *,
        order_id: str,
        location_id: str,
        lines: Sequence[tuple[str, int]],
        reason_code: str,
    ) -> None:
        """A short pick: let go of the units the location could not find.

        The picked units stay held until they ship; routing holds the missing
        ones elsewhere.
        """

        def release_missing(
            held: dict[str, domain.Reservation], rows: dict[StockKey, StockRow], now: datetime
        ) -> list[tuple[domain.Reservation, list[domain.Line]]]:
            changed, _ = _take_units(held, rows, location_id, lines, now, domain.release_units)
            return changed

        released = await self._change_order_holds(conn, order_id, location_id, release_missing)
        await self._announce_released(conn, released, reason_code)

    async def hold_arrived_transfer(
        self,
        conn: Connection,
        *,
        fulfilment_id: str,
        order_id: str,
        location_id: str,
        lines: Sequence[tuple[str, int]],
        received_at: datetime,
    ) -> None:
        """A transfer reached the pickup store: hold its goods there for the order.

        Shipping the transfer consumed the order's hold at the source. Until the
        customer collects (or the pickup expires) the goods must not be sold to
        anyone else at the pickup store, so they get an order hold of their own
        in the order's channel. Its id comes from the transfer, so a redelivered
        event adds nothing. The ledger's transfer-in may be projected before or
        after this hold: until it is, the hold is covered by the grace period
        that departures have too. A receipt handled before its shipment (two
        replicas) is retried for a while; after that nothing is held, and the
        log says so.
        """
        reservation_id = str(uuid.uuid5(TRANSFER_ARRIVALS, fulfilment_id))
        if await storage.load_reservations(conn, [reservation_id]):
            return
        consumed = await storage.consumptions_of(conn, fulfilment_id)
        sources = await storage.load_reservations(conn, {rid for rid, _, _ in consumed})
        if not sources:
            if datetime.now(UTC) - received_at < ARRIVAL_WAITS_FOR_SHIPMENT:
                # Another replica may still be handling the transfer's shipment:
                # fail this delivery so the consumer retries it after a back-off.
                raise ShipmentNotSeenYet(fulfilment_id)
            log.warning(
                "reservation.transfer_without_hold", fulfilment_id=fulfilment_id, order_id=order_id
            )
            return
        units: dict[str, int] = {}
        for sku, quantity in lines:
            units[sku] = units.get(sku, 0) + quantity
        keys = sorted((sku, location_id) for sku in units)
        for sku, _ in keys:
            await storage.ensure_known(conn, sku, location_id)
        await storage.lock_skus(conn, units)
        locked = await storage.lock_stock(conn, keys)
        now = datetime.now(UTC)
        hold = domain.Reservation(
            reservation_id=reservation_id,
            channel=next(iter(sources.values())).channel,
            reference=order_id,
            kind=domain.Kind.ORDER,
            lines=tuple(
                domain.Line(number, sku, location, units[sku])
                for number, (sku, location) in enumerate(keys, start=1)
            ),
            created_at=now,
            updated_at=now,
            expires_at=None,
        )
        changes = Changes()
        for line in hold.lines:
            row = locked[line.key][0] if line.key in locked else StockRow(*line.key, 0, 0)
            row.held += line.quantity
            changes.add(row)
        await storage.write_holds(conn, [hold], [], [])
        await storage.save_stock(conn, changes.rows.values())
        created = events_pb2.ReservationCreated(reservation=convert.reservation_out(hold))
        await outbox.append(
            conn,
            SCHEMA,
            PRODUCER,
            [_outgoing("reservation.created", created, hold), *await self._announce(conn, changes)],
        )

    async def release_for_fulfilment(
        self,
        conn: Connection,
        *,
        order_id: str,
        location_id: str,
        skus: Sequence[str],
        reason_code: str,
    ) -> None:
        """A fulfilment was cancelled: let go of the order holds behind it."""
        wanted = set(skus)

        def release_all(
            held: dict[str, domain.Reservation], rows: dict[StockKey, StockRow], now: datetime
        ) -> list[tuple[domain.Reservation, list[domain.Line]]]:
            out = []
            for rid, reservation in held.items():
                lines = [
                    line
                    for line in reservation.lines
                    if line.location_id == location_id
                    and line.sku in wanted
                    and line.status is LineStatus.ACTIVE
                ]
                if not lines:
                    continue
                released, freed = domain.end_lines(reservation, lines, LineStatus.RELEASED, now)
                for key, units in freed.items():
                    rows[key].held -= units
                held[rid] = released
                out.append((released, lines))
            return out

        released = await self._change_order_holds(conn, order_id, location_id, release_all)
        await self._announce_released(conn, released, reason_code)

    async def _announce_released(
        self,
        conn: Connection,
        released: list[tuple[domain.Reservation, list[domain.Line]]],
        reason_code: str,
    ) -> None:
        """ReservationReleased for each reservation whose lines (some units of them) ended."""
        for reservation, lines in released:
            ended = [line for line in lines if line.status is not LineStatus.ACTIVE]
            m.ENDED_LINES.labels("released").inc(len(ended))
            event = events_pb2.ReservationReleased(
                reservation=convert.reservation_out(reservation),
                line_numbers=[line.line_number for line in lines],
                reason_code=reason_code,
            )
            await outbox.append(
                conn, SCHEMA, PRODUCER, [_outgoing("reservation.released", event, reservation)]
            )

    # -- sweepers -----------------------------------------------------------------

    async def expire_due(self, limit: int = 200) -> int:
        """Release cart holds whose time ran out; safe with several sweepers at once."""
        now = datetime.now(UTC)
        async with self.pool.acquire() as conn:
            candidates = await storage.due_cart_holds(conn, now, limit)
        if not candidates:
            return 0

        async def work(conn: Connection) -> int:
            found = await storage.load_reservations(conn, candidates)
            rows = await self._lock_stock_of(conn, found.values())
            # Claimed after the stock locks (the global lock order); a hold another
            # sweeper expired meanwhile is no longer due and is left out.
            claimed = await storage.claim_due_cart_holds(conn, candidates, now)
            if not claimed:
                return 0
            reservations = await storage.load_reservations(conn, claimed)
            changes = Changes()
            events: list[OutgoingEvent] = []
            expired = []
            for reservation in reservations.values():
                active = [line for line in reservation.lines if line.status is LineStatus.ACTIVE]
                ended, freed = domain.end_lines(reservation, active, LineStatus.EXPIRED, now)
                changes.rows.update(_free(rows, freed).rows)
                expired.append(ended)
                events.append(_event("reservation.expired", events_pb2.ReservationExpired, ended))
                m.ENDED_LINES.labels("expired").inc(len(active))
            await storage.save_reservations(conn, expired)
            await storage.save_stock(conn, changes.rows.values())
            await outbox.append(
                conn, SCHEMA, PRODUCER, events + await self._announce(conn, changes)
            )
            return len(expired)

        count = await unit_of_work(self.pool, work)
        m.EXPIRED_HOLDS.inc(count)
        return count

    async def flag_overdue_shortages(self, limit: int = 100) -> int:
        """Mark short the holds a departure left uncovered for longer than the grace period.

        A shipment lowers on-hand before (or after) fulfilment's event consumes the
        hold behind it; only a shortage that outlives the grace period is real.
        """
        async with self.pool.acquire() as conn:
            keys = await storage.overdue_shortages(conn, self._short_grace, limit)
        flagged = 0
        for key in keys:

            async def work(conn: Connection, key: StockKey = key) -> int:
                await storage.lock_skus(conn, [key[0]])
                locked = await storage.lock_stock(conn, [key])
                if key not in locked:
                    return 0
                row = locked[key][0]
                if row.on_hand >= row.committed:
                    await storage.save_stock(conn, [row])  # clears short_since
                    return 0
                events = await self._mark_short(conn, row, "overdue")  # saves the row
                changes = Changes()
                changes.add(row)
                await outbox.append(
                    conn, SCHEMA, PRODUCER, events + await self._announce(conn, changes)
                )
                return 1

            flagged += await unit_of_work(self.pool, work)
        return flagged

    async def refresh_gauges(self) -> None:
        """Set the active-holds gauges from the database."""
        async with self.pool.acquire() as conn:
            holds, units = await storage.active_hold_totals(conn)
        m.ACTIVE_HOLDS.set(holds)
        m.HELD_UNITS.set(units)

    # -- helpers --------------------------------------------------------------------

    async def _once(
        self,
        method: str,
        request_id: str,
        content: bytes,
        execute: Callable[[Connection], Awaitable[T]],
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
    ) -> T:
        """Run ``execute`` once per request id in one transaction; replay its answer after."""
        return await once_in_transaction(
            self.pool,
            schema=SCHEMA,
            method=method,
            request_id=request_id,
            content=content,
            execute=execute,
            encode=encode,
            decode=decode,
        )

    async def _once_reservation(
        self,
        method: str,
        request_id: str,
        content: bytes,
        execute: Callable[[Connection], Awaitable[domain.Reservation]],
    ) -> domain.Reservation:
        return await self._once(
            method,
            request_id,
            content,
            execute,
            convert.encode_reservation,
            convert.decode_reservation,
        )

    async def _locked(self, conn: Connection, reservation_id: str) -> domain.Reservation:
        found = await storage.load_reservations(conn, [reservation_id], lock=True)
        return _found(found, reservation_id)

    async def _lock_with_stock(
        self, conn: Connection, reservation_id: str
    ) -> tuple[domain.Reservation, dict[StockKey, StockRow]]:
        """Lock a reservation's SKUs, stock rows, then the reservation (the global order)."""
        first = _found(await storage.load_reservations(conn, [reservation_id]), reservation_id)
        rows = await self._lock_stock_of(conn, [first])
        return await self._locked(conn, reservation_id), rows

    async def _lock_stock_of(
        self, conn: Connection, reservations: Iterable[domain.Reservation]
    ) -> dict[StockKey, StockRow]:
        # A line's (sku, location) never changes, so keys read before locking hold.
        keys = {line.key for r in reservations for line in r.lines}
        await storage.lock_skus(conn, {sku for sku, _ in keys})
        locked = await storage.lock_stock(conn, keys)
        return {key: row for key, (row, _) in locked.items()}

    async def _track_departures(
        self,
        conn: Connection,
        fulfilment_id: str,
        location_id: str,
        rows: dict[StockKey, StockRow],
        more: dict[str, tuple[int, int]],
    ) -> None:
        """Add (consumed, departed) units of a fulfilment at a location; rows' departing follow.

        Both sides call this holding the stock rows' locks, so the two events of
        one departure are matched one after the other, never at once.
        """
        more = {sku: units for sku, units in more.items() if units != (0, 0)}
        if not more:
            return
        seen = await storage.departures_at(conn, fulfilment_id, location_id, more)
        for sku, (consumed, departed) in more.items():
            total, change = domain.departing_change(
                *seen.get(sku, (0, 0)), more_consumed=consumed, more_departed=departed
            )
            seen[sku] = total
            row = rows[(sku, location_id)]
            row.departing = max(0, row.departing + change)
        await storage.save_departures(conn, fulfilment_id, location_id, seen)

    async def _change_order_holds(
        self,
        conn: Connection,
        order_id: str,
        location_id: str,
        change: Callable[
            [dict[str, domain.Reservation], dict[StockKey, StockRow], datetime],
            list[tuple[domain.Reservation, list[domain.Line]]],
        ],
        *,
        before_save: Callable[[dict[StockKey, StockRow]], Awaitable[None]] | None = None,
    ) -> list[tuple[domain.Reservation, list[domain.Line]]]:
        ids = await storage.order_holds(conn, order_id, location_id)
        if not ids:
            log.info("reservation.no_order_hold", order_id=order_id, location_id=location_id)
            return []
        rows = await self._lock_stock_of(
            conn, (await storage.load_reservations(conn, ids)).values()
        )
        locked = await storage.load_reservations(conn, ids, lock=True)
        held = {rid: locked[rid] for rid in ids if rid in locked and locked[rid].active}
        changed = change(held, rows, datetime.now(UTC))
        if changed:
            if before_save is not None:
                await before_save(rows)  # under the stock locks, before anything is written
            changes = Changes()
            for _, lines in changed:
                for line in lines:
                    changes.add(rows[line.key])
            await storage.save_reservations(conn, [r for r, _ in changed])
            await storage.save_stock(conn, changes.rows.values())
            await outbox.append(conn, SCHEMA, PRODUCER, await self._announce(conn, changes))
        return changed

    async def _mark_short(
        self, conn: Connection, row: StockRow, trigger: str, at_most: int | None = None
    ) -> list[OutgoingEvent]:
        """Mark the newest lines at ``row`` short until the rest fits (or ``at_most``
        units are covered); ``row`` is updated."""
        ids = await storage.active_reservations_at(conn, row.key)
        reservations = await storage.load_reservations(conn, ids, lock=True)
        newest_first = [
            (rid, line)
            for rid in ids
            for line in reservations[rid].lines
            if line.key == row.key and line.status is LineStatus.ACTIVE
        ]
        chosen = domain.lines_to_short(row, [line for _, line in newest_first], at_most)
        # lines_to_short takes a prefix of the newest-first lines. Lines of two
        # reservations can be equal as values, so pick by position, not by value.
        by_reservation: dict[str, list[domain.Line]] = {}
        for rid, line in newest_first[: len(chosen)]:
            by_reservation.setdefault(rid, []).append(line)
        now = datetime.now(UTC)
        events = []
        shorted = []
        for rid, lines in by_reservation.items():
            short, freed = domain.end_lines(reservations[rid], lines, LineStatus.SHORT, now)
            row.held -= sum(freed.values())
            shorted.append(short)
            event = events_pb2.ReservationShort(
                reservation=convert.reservation_out(short),
                line_numbers=[line.line_number for line in lines],
            )
            events.append(_outgoing("reservation.short", event, short))
            m.SHORT_LINES.labels(trigger).inc(len(lines))
            m.ENDED_LINES.labels("short").inc(len(lines))
        await storage.save_reservations(conn, shorted)
        await storage.save_stock(conn, [row])
        return events

    async def _ledger_level(self, key: StockKey) -> tuple[int, int]:
        """Sellable on-hand and balance version of ``key`` straight from the ledger."""
        request = ledger_pb.GetStockLevelsRequest(
            skus=[key[0]],
            location_ids=[key[1]],
            states=[types_pb2.STOCK_STATE_SELLABLE],
            include_zero=True,
        )
        try:
            async with self._channels.open(self._ledger_target) as channel:
                stub = ledger_grpc.StockLedgerServiceStub(channel)
                response = await stub.GetStockLevels(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            # The ledger is away: retry the event later, do not dead-letter it.
            raise Aborted(
                "LEDGER_UNAVAILABLE",
                f"Cannot resync {key[0]}@{key[1]} from the ledger: {error.code().name}",
            ) from error
        for level in response.levels:
            return level.on_hand, level.balance_version
        return 0, 0

    async def _announce(
        self, conn: Connection, changes: Changes, rules: domain.Rules | None = None
    ) -> list[OutgoingEvent]:
        """AvailabilityChanged per changed (sku, location) and per affected channel network."""
        if not changes.rows:
            return []
        rules = rules or await self._rules.get(conn)
        skus = {sku for sku, _ in changes.rows}
        versions = await storage.bump_versions(conn, skus)
        every_row = await storage.stock_of_skus(conn, skus)
        every_row.update(changes.rows)
        return self._figures(changes, rules, versions, every_row)

    def _figures(
        self,
        changes: Changes,
        rules: domain.Rules,
        versions: dict[str, int],
        every_row: dict[StockKey, StockRow],
    ) -> list[OutgoingEvent]:
        """The AvailabilityChanged events of ``changes`` from rows read under the SKU locks."""
        recorded_at = changes.movement_recorded_at
        events = []
        networks: dict[str, set[str]] = {}
        for (sku, location_id), row in sorted(changes.rows.items()):
            version = versions[sku]
            channels = rules.channels_at(location_id)
            figures = [rules.figure(row, "", version)]
            figures += [rules.figure(row, channel, version) for channel in channels]
            events.append(
                OutgoingEvent(
                    AVAILABILITY_SUBJECT,
                    convert.availability_changed(figures, recorded_at),
                    f"{sku}@{location_id}",
                )
            )
            networks.setdefault(sku, set()).update(channels)
        for sku, selling in sorted(networks.items()):
            for channel in sorted(selling):
                figure = rules.network_figure(sku, channel, every_row, versions[sku])
                events.append(
                    OutgoingEvent(
                        AVAILABILITY_SUBJECT,
                        convert.availability_changed([figure], recorded_at),
                        f"{sku}@channel:{channel}",
                    )
                )
        return events


def figures_for(
    rules: domain.Rules,
    versions: dict[str, int],
    rows: dict[StockKey, StockRow],
    channel: str,
    skus: Sequence[str],
    location_ids: Sequence[str],
    include_locations: bool,
    available_only: bool = False,
) -> list[SkuFigures]:
    """The figures of ``skus`` for ``channel`` from one consistent read."""
    channel_rules = rules.channel(channel)
    unknown = [
        FieldViolation(f"skus[{i}]", f"unknown SKU {sku!r}")
        for i, sku in enumerate(skus)
        if sku not in versions
    ]
    if unknown:
        raise InvalidArgument(unknown)
    not_sold = [loc for loc in location_ids if loc not in channel_rules.location_ids]
    if not_sold:
        raise domain.not_sellable(channel, not_sold[0])
    chosen = list(location_ids) or (list(channel_rules.location_ids) if include_locations else [])
    out = []
    for sku in dict.fromkeys(skus):
        version = versions[sku]
        out.append(
            SkuFigures(
                sku=sku,
                network=rules.network_figure(sku, channel, rows, version),
                locations=_location_figures(
                    rules, rows, sku, channel, version, chosen, available_only
                ),
            )
        )
    return out


def _location_figures(
    rules: domain.Rules,
    rows: dict[StockKey, StockRow],
    sku: str,
    channel: str,
    version: int,
    locations: Sequence[str],
    available_only: bool,
) -> list[domain.Figure]:
    """Figures of ``sku`` at ``locations``; only those with units available if asked."""
    figures = []
    for loc in locations:
        row = rows.get((sku, loc))
        if row is None:
            if available_only:
                continue  # no stock row: nothing on hand, nothing available
            row = StockRow(sku, loc)
        figure = rules.figure(row, channel, version)
        if available_only and figure.available <= 0:
            continue
        figures.append(figure)
    return figures


def check_availability_request(
    channel: str, skus: Sequence[str], location_ids: Sequence[str]
) -> None:
    """Reject a malformed GetAvailability or WatchAvailability request whole."""
    problems = check_id(channel, "channel", "the channel")
    if not skus:
        problems.append(FieldViolation("skus", "at least one SKU is required"))
    if len(skus) > domain.MAX_AVAILABILITY_SKUS:
        problems.append(FieldViolation("skus", f"at most {domain.MAX_AVAILABILITY_SKUS} SKUs"))
    for i, sku in enumerate(skus[: domain.MAX_AVAILABILITY_SKUS]):
        problems += check_id(sku, f"skus[{i}]", "the sku")
    if len(location_ids) > domain.MAX_CHANNEL_LOCATIONS:
        problems.append(
            FieldViolation("location_ids", f"at most {domain.MAX_CHANNEL_LOCATIONS} locations")
        )
    for i, loc in enumerate(location_ids[: domain.MAX_CHANNEL_LOCATIONS]):
        problems += check_id(loc, f"location_ids[{i}]", "the location id")
    if problems:
        raise InvalidArgument(problems)


def _check_reservation_id(reservation_id: str) -> list[FieldViolation]:
    try:
        uuid.UUID(reservation_id)
    except ValueError:
        return [
            FieldViolation("reservation_id", f"{reservation_id[:40]!r} is not a reservation id")
        ]
    return []


def _found(found: dict[str, domain.Reservation], reservation_id: str) -> domain.Reservation:
    reservation = found.get(str(uuid.UUID(reservation_id)))
    if reservation is None:
        raise NotFound(
            "RESERVATION_NOT_FOUND",
            f"No reservation {reservation_id}.",
            {"reservation_id": reservation_id},
        )
    return reservation


def _require_live_cart(reservation: domain.Reservation, now: datetime, action: str) -> None:
    domain.require_active_cart(reservation, action)
    if reservation.expires_at is not None and reservation.expires_at <= now:
        # Its time ran out; the sweeper is about to release it. Holding on now
        # would make expiry depend on the sweeper's timing.
        raise domain.expired(reservation, action)


def _free(rows: dict[StockKey, StockRow], freed: dict[StockKey, int]) -> Changes:
    changes = Changes()
    for key, units in freed.items():
        if units:
            rows[key].held -= units
            changes.add(rows[key])
    return changes


def _event(
    name: str,
    event_type: type[events_pb2.ReservationExtended] | type[events_pb2.ReservationExpired],
    reservation: domain.Reservation,
) -> OutgoingEvent:
    return _outgoing(
        name, event_type(reservation=convert.reservation_out(reservation)), reservation
    )


UnitStep = Callable[
    [domain.Reservation, str, str, int, datetime],
    tuple[domain.Reservation, domain.Line | None, int],
]


def _take_units(
    held: dict[str, domain.Reservation],
    rows: dict[StockKey, StockRow],
    location_id: str,
    lines: Sequence[tuple[str, int]],
    now: datetime,
    take: UnitStep,
    taken_by_line: dict[tuple[str, int], int] | None = None,
) -> tuple[list[tuple[domain.Reservation, list[domain.Line]]], dict[str, int]]:
    """Take units per SKU from the order's active lines at ``location_id``, oldest id first.

    ``take`` consumes or releases them (``domain.consume``, ``domain.release_units``);
    the stock rows' held counts follow. Returns the changed reservations with
    their changed lines, and the units per SKU no line held. ``taken_by_line``
    collects the units taken per (reservation id, line number).
    """
    touched: dict[str, dict[int, domain.Line]] = {}
    unheld: dict[str, int] = {}
    for sku, quantity in lines:
        remaining = quantity
        for rid in list(held):
            if remaining <= 0:
                break
            held[rid], line, units = take(held[rid], sku, location_id, remaining, now)
            if line is None or units == 0:
                continue
            remaining -= units
            rows[line.key].held -= units
            touched.setdefault(rid, {})[line.line_number] = line
            if taken_by_line is not None:
                key = (rid, line.line_number)
                taken_by_line[key] = taken_by_line.get(key, 0) + units
        if remaining > 0:
            unheld[sku] = unheld.get(sku, 0) + remaining
    return [(held[rid], list(changed.values())) for rid, changed in touched.items()], unheld


def _outgoing(name: str, payload: Message, reservation: domain.Reservation) -> OutgoingEvent:
    return OutgoingEvent(f"{SUBJECT}.{name}", payload, reservation.reservation_id)


def _no_answer(_: object) -> bytes:
    return b""
