"""Use cases of the fulfilment service: tasks from routed orders, and one step per call.

Each step runs in one transaction: the task row is locked, the state machine
(``services.fulfilment.domain``) applies the step, the task and the events the
step causes go to the database together, and the answer is kept for the
step's ``request_id``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message

from omni.fulfilment.v1 import events_pb2
from omni.fulfilment.v1 import resources_pb2 as pb
from omni.routing.v1 import resources_pb2 as routing_pb
from omnistock.db import Connection, Pool, unit_of_work
from omnistock.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from omnistock.idempotency import (
    once_in_transaction,
    require_request_id,
)
from omnistock.messaging import outbox
from omnistock.messaging.envelope import OutgoingEvent
from omnistock.validation import check_id, check_reason, check_text
from services.fulfilment import convert, domain, storage
from services.fulfilment import metrics as m
from services.fulfilment.domain import ENDED, Fulfilment, Item, Status

SCHEMA = "fulfilment"
PRODUCER = "fulfilment"
SUBJECT = "omni.fulfilment.fulfilment"
DEFAULT_PAGE_SIZE = 50
OPEN = tuple(s for s in Status if s not in ENDED)
# The step label of each RPC in omni_fulfilment_steps_total.
STEP_NAMES = {
    "AcceptFulfilment": "accept",
    "RejectFulfilment": "reject",
    "ConfirmPick": "pick",
    "PackFulfilment": "pack",
    "ShipFulfilment": "ship",
    "ReceiveTransfer": "receive",
    "MarkReadyForPickup": "ready",
    "CollectFulfilment": "collect",
    "CancelFulfilment": "cancel",
}

Step = Callable[[Fulfilment], tuple[Fulfilment, list[OutgoingEvent]]]


def event(name: str, payload: Message, f: Fulfilment) -> OutgoingEvent:
    """A fact about a task, keyed by its order so one order's facts stay in order."""
    return OutgoingEvent(f"{SUBJECT}.{name}", payload, f.order_id)


def tasks_for_plan(
    order: routing_pb.Order, *, now: datetime, accept_within: timedelta
) -> list[Fulfilment]:
    """One task per (source, kind) for the plan's held allocations."""
    groups: dict[
        tuple[str, routing_pb.FulfilmentType.ValueType, str], list[routing_pb.Allocation]
    ] = {}
    for a in order.allocations:
        if (
            a.status == routing_pb.ALLOCATION_STATUS_HELD
            and a.plan_number == order.plan.plan_number
        ):
            groups.setdefault((a.location_id, a.type, a.pickup_location_id), []).append(a)
    tasks = []
    for (location_id, kind, pickup), allocations in sorted(groups.items()):
        units: dict[tuple[int, str], int] = {}
        for a in allocations:
            units[(a.line_number, a.sku)] = units.get((a.line_number, a.sku), 0) + a.quantity
        tasks.append(
            Fulfilment(
                fulfilment_id=str(uuid.uuid4()),
                order_id=order.order_id,
                channel=order.channel,
                location_id=location_id,
                kind=convert.KINDS_FROM_ROUTING[kind],
                items=tuple(Item(n, sku, q) for (n, sku), q in sorted(units.items())),
                pickup_location_id=pickup,
                plan_number=order.plan.plan_number,
                accept_by=now + accept_within,
            )
        )
    return tasks


class FulfilmentHandlers:
    """The fulfilment service's use cases."""

    def __init__(
        self,
        pool: Pool,
        *,
        accept_within: timedelta,
        pickup_window: timedelta,
        code_secret: bytes,
    ) -> None:
        self.pool = pool
        self.accept_within = accept_within
        self.pickup_window = pickup_window
        self.code_secret = code_secret

    # -- from routing's events ----------------------------------------------------------

    async def create_for_plan(self, conn: Connection, order: routing_pb.Order) -> None:
        """Create the tasks of a routed (or rerouted) order's new plan."""
        now = datetime.now(UTC)
        kept = await storage.insert(
            conn, tasks_for_plan(order, now=now, accept_within=self.accept_within)
        )
        created = [
            event("created", events_pb2.FulfilmentCreated(fulfilment=convert.fulfilment_out(f)), f)
            for f in kept
        ]
        for f in kept:
            m.TASKS_CREATED.labels(f.kind.value).inc()
        await outbox.append(conn, SCHEMA, PRODUCER, created)

    async def cancel_for_order(
        self,
        conn: Connection,
        order_id: str,
        cancelled: set[tuple[str, int]],
        reason_code: str,
    ) -> None:
        """Stop the work of cancelled order lines (``cancelled``: (source, line number)).

        A task all of whose lines were cancelled stops (where that is still
        possible); one with other lines goes on without the cancelled ones.
        """
        events = []
        for f in await storage.open_for_order(conn, order_id):
            lines = {n for location, n in cancelled if location == f.location_id}
            gone = [i for i in f.items if i.line_number in lines]
            if not gone:
                continue
            try:
                if len(gone) == len(f.items):
                    changed = domain.cancel_for_order(f, reason_code)
                else:
                    changed = domain.drop_lines(f, lines)
            except FailedPrecondition:
                continue  # the goods went to the customer; routing knows what was cancelled
            await storage.save(conn, changed)
            if changed.status is Status.CANCELLED:
                events.append(self._cancelled(changed))
        await outbox.append(conn, SCHEMA, PRODUCER, events)

    # -- queries --------------------------------------------------------------------------

    async def get(self, fulfilment_id: str) -> Fulfilment:
        """One task."""
        _check_task_id(fulfilment_id)
        async with self.pool.acquire() as conn:
            found = await storage.load(conn, fulfilment_id)
        if found is None:
            raise _not_found(fulfilment_id)
        return found

    async def queue(
        self, location_id: str, statuses: Sequence[int], page_size: int, page_token: str
    ) -> tuple[list[Fulfilment], str]:
        """A location's tasks, oldest first, a page at a time."""
        problems = domain.queue_problems(location_id, len(statuses), page_size, page_token)
        wanted = []
        for i, value in enumerate(statuses):
            status = convert.STATUSES_IN.get(value)  # type: ignore[call-overload]
            if status is None:
                problems.append(FieldViolation(f"statuses[{i}]", "not a fulfilment status"))
            else:
                wanted.append(status)
        after = None
        if page_token and len(page_token) <= domain.MAX_PAGE_TOKEN_LENGTH:
            try:
                stamp, last_id = base64.urlsafe_b64decode(page_token.encode()).decode().split("|")
                at = datetime.fromisoformat(stamp)
                if at.tzinfo is None:
                    raise ValueError("the tokens this service gives carry the UTC offset")
                after = (at.astimezone(UTC), str(uuid.UUID(last_id)))
            except (ValueError, OverflowError):  # a forged token, e.g. year 1 at +14:00
                problems.append(FieldViolation("page_token", "is not a token this service gave"))
        if problems:
            raise InvalidArgument(problems)
        limit = page_size or DEFAULT_PAGE_SIZE
        async with self.pool.acquire() as conn:
            found = await storage.queue(conn, location_id, wanted, after, limit + 1)
        page, more = found[:limit], len(found) > limit
        token = ""
        last_created = page[-1].created_at if page else None
        if more and last_created is not None:
            raw = f"{last_created.isoformat()}|{page[-1].fulfilment_id}"
            token = base64.urlsafe_b64encode(raw.encode()).decode()
        return page, token

    # -- steps ----------------------------------------------------------------------------

    async def step(
        self, method: str, request_id: str, fulfilment_id: str, content: bytes, apply: Step
    ) -> pb.Fulfilment:
        """Apply one step to a task, once per request id (``content`` is the request's)."""
        require_request_id(request_id)
        _check_task_id(fulfilment_id)

        async def execute(conn: Connection) -> pb.Fulfilment:
            found = await storage.load(conn, fulfilment_id, lock=True)
            if found is None:
                raise _not_found(fulfilment_id)
            changed, events = apply(found)
            saved = await storage.save(conn, changed)
            await outbox.append(conn, SCHEMA, PRODUCER, events)
            executed.append(method)
            return convert.fulfilment_out(saved)

        executed: list[str] = []  # empty when the answer was replayed
        try:
            answer = await once_in_transaction(
                self.pool,
                schema=SCHEMA,
                method=method,
                request_id=request_id,
                content=content,
                execute=execute,
                encode=lambda out: out.SerializeToString(),
                decode=pb.Fulfilment.FromString,
            )
        except PermissionDenied as refused:
            if refused.reason == domain.WRONG_PICKUP_CODE:
                m.WRONG_PICKUP_CODES.inc()
            raise
        if executed:
            m.STEPS.labels(STEP_NAMES.get(method, method)).inc()
        return answer

    def accept(self, f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
        """The location takes the task."""
        done = domain.accept(f)
        return done, [
            event(
                "accepted",
                events_pb2.FulfilmentAccepted(fulfilment=convert.fulfilment_out(done)),
                done,
            )
        ]

    def reject(self, reason_code: str) -> Step:
        """The location refuses the task; routing routes it elsewhere."""
        problems = check_reason(reason_code, "reason_code", required=True)
        if problems:
            raise InvalidArgument(problems)

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done = domain.reject(f, reason_code)
            return done, [self._rejected(done)]

        return apply

    def confirm_pick(self, picked: dict[str, int], reason_code: str) -> Step:
        """Units picked per SKU; a shortfall is announced for rerouting."""
        problems = check_reason(reason_code, "reason_code", required=False)
        if problems:
            raise InvalidArgument(problems)

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done, short = domain.confirm_pick(f, picked)
            if done.status is Status.REJECTED:
                return done, [self._rejected(done)]
            events = []
            if short:
                m.SHORT_PICKED_UNITS.inc(sum(short.values()))
                events.append(
                    event(
                        "short_picked",
                        events_pb2.FulfilmentShortPicked(
                            fulfilment_id=done.fulfilment_id,
                            order_id=done.order_id,
                            location_id=done.location_id,
                            short_lines=convert.lines(sorted(short.items())),
                            reason_code=reason_code or "NOT_FOUND",
                        ),
                        done,
                    )
                )
            return done, events

        return apply

    def pack(self, f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
        """The picked goods are packed."""
        return domain.pack(f), []

    def ship(self, carrier: str, tracking_number: str) -> Step:
        """The packed goods leave with a carrier."""
        problems = check_id(carrier, "carrier", "the carrier")
        problems += check_text(tracking_number, "tracking_number", 64)
        if not tracking_number:
            problems.append(
                FieldViolation("tracking_number", "the carrier's tracking number is required")
            )
        if problems:
            raise InvalidArgument(problems)

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done = domain.ship(f, carrier, tracking_number)
            shipped = events_pb2.FulfilmentShipped(
                fulfilment_id=done.fulfilment_id,
                order_id=done.order_id,
                location_id=done.location_id,
                lines=convert.lines(domain.picked_items(done)),
                carrier=carrier,
                tracking_number=tracking_number,
                type=convert.KINDS_OUT[done.kind],
                destination_location_id=done.pickup_location_id
                if done.kind is domain.Kind.TRANSFER_TO_STORE
                else "",
            )
            shipped.shipped_at.GetCurrentTime()
            return done, [event("shipped", shipped, done)]

        return apply

    def receive(self, f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
        """A transfer arrived at the pickup store."""
        done = domain.receive_transfer(f)
        received = events_pb2.TransferReceived(
            fulfilment_id=done.fulfilment_id,
            order_id=done.order_id,
            source_location_id=done.location_id,
            location_id=done.pickup_location_id,
            lines=convert.lines(domain.picked_items(done)),
        )
        received.received_at.GetCurrentTime()
        events = [event("transfer_received", received, done)]
        if done.status is Status.CANCELLED:  # the order was cancelled on the way
            events.append(self._cancelled(done))
        return done, events

    def mark_ready(self, code: str) -> Step:
        """The goods wait at the pickup store; the code goes to the channel only."""

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done = domain.mark_ready(f, code, self.code_secret)
            done = replace(done, collect_by=datetime.now(UTC) + self.pickup_window)
            ready = events_pb2.FulfilmentReadyForPickup(
                fulfilment_id=done.fulfilment_id,
                order_id=done.order_id,
                channel=done.channel,
                location_id=done.pickup_location_id or done.location_id,
                pickup_code=code,
            )
            assert done.collect_by is not None
            ready.collect_by.FromDatetime(done.collect_by)
            return done, [event("ready_for_pickup", ready, done)]

        return apply

    def collect(self, code: str) -> Step:
        """The customer collects with the right code."""
        domain.check_pickup_code(code)

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done = domain.collect(f, code, self.code_secret)
            collected = events_pb2.FulfilmentCollected(
                fulfilment_id=done.fulfilment_id,
                order_id=done.order_id,
                location_id=done.pickup_location_id or done.location_id,
                lines=convert.lines(domain.picked_items(done)),
            )
            collected.collected_at.GetCurrentTime()
            return done, [event("collected", collected, done)]

        return apply

    def cancel(self, reason_code: str) -> Step:
        """Stop a task before its goods leave."""
        problems = check_reason(reason_code, "reason_code", required=True)
        if problems:
            raise InvalidArgument(problems)

        def apply(f: Fulfilment) -> tuple[Fulfilment, list[OutgoingEvent]]:
            done = domain.cancel(f, reason_code)
            return done, [self._cancelled(done)]

        return apply

    # -- sweepers -------------------------------------------------------------------------

    async def expire_due(self, batch: int) -> int:
        """Tasks not accepted in time, and pickups not collected in time, end."""

        async def work(conn: Connection) -> list[str]:
            due = await storage.claim_due(conn, batch)
            events = []
            causes = []
            for f in due:
                if f.status is Status.CREATED:
                    done = domain.expire_task(f)
                    cause = events_pb2.EXPIRY_CAUSE_TASK_NOT_ACCEPTED
                    causes.append("not_accepted")
                else:
                    done = domain.expire_pickup(f)
                    cause = events_pb2.EXPIRY_CAUSE_PICKUP_NOT_COLLECTED
                    causes.append("not_collected")
                await storage.save(conn, done)
                not_collected = cause == events_pb2.EXPIRY_CAUSE_PICKUP_NOT_COLLECTED
                expired = events_pb2.FulfilmentExpired(
                    fulfilment_id=done.fulfilment_id,
                    order_id=done.order_id,
                    location_id=domain.goods_location(done),
                    # What waited at the store, or the work nobody accepted.
                    lines=convert.lines(
                        domain.picked_items(done)
                        if not_collected
                        else [(i.sku, i.quantity) for i in done.items]
                    ),
                    cause=cause,
                )
                events.append(event("expired", expired, done))
            await outbox.append(conn, SCHEMA, PRODUCER, events)
            return causes

        causes = await unit_of_work(self.pool, work)
        for cause in causes:
            m.EXPIRED.labels(cause).inc()
        return len(causes)

    async def refresh_gauges(self) -> None:
        """Open tasks by kind and status, and the oldest task waiting to be accepted."""
        async with self.pool.acquire() as conn:
            counts, oldest = await storage.open_task_figures(conn)
        for kind in domain.Kind:
            for status in OPEN:
                m.OPEN_TASKS.labels(kind.value, status.value).set(counts.get((kind, status), 0))
            m.OLDEST_OPEN_TASK_AGE.labels(kind.value).set(oldest.get(kind, 0.0))

    def _rejected(self, f: Fulfilment) -> OutgoingEvent:
        return event(
            "rejected",
            events_pb2.FulfilmentRejected(
                fulfilment_id=f.fulfilment_id,
                order_id=f.order_id,
                location_id=f.location_id,
                lines=convert.lines([(i.sku, i.quantity) for i in f.items]),
                reason_code=f.reason_code,
            ),
            f,
        )

    def _cancelled(self, f: Fulfilment) -> OutgoingEvent:
        return event(
            "cancelled",
            events_pb2.FulfilmentCancelled(
                fulfilment_id=f.fulfilment_id,
                order_id=f.order_id,
                location_id=domain.goods_location(f),
                lines=convert.lines([(i.sku, i.quantity) for i in f.items]),
                reason_code=f.reason_code,
            ),
            f,
        )


def _check_task_id(fulfilment_id: str) -> None:
    try:
        uuid.UUID(fulfilment_id)
    except ValueError:
        raise InvalidArgument(
            [FieldViolation("fulfilment_id", "is not a fulfilment id (a UUID)")]
        ) from None


def _not_found(fulfilment_id: str) -> NotFound:
    return NotFound(
        "FULFILMENT_NOT_FOUND", f"No fulfilment {fulfilment_id}.", {"fulfilment_id": fulfilment_id}
    )
