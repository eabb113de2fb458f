"""Use cases of the routing service.

Routing an order talks to the reservation service (availability, holds)
between two transactions of its own, so it runs as a small saga under a lease
on the order row:

1. the order is kept in ROUTING with a lease (and ``work_due_at`` at the
   lease's end, so an interrupted routing is resumed by the routing worker);
2. holds of the order that routing did not record (an interrupted attempt's)
   are released; then plan → hold, planning again when stock moved;
3. one transaction re-reads the order under a row lock, counts the daily
   capacity of the new sources, keeps allocations and plan, writes the events
   and the idempotent answer, and gives the lease back.

Fulfilment and reservation facts change orders inside their consumers'
transactions (no remote calls there); a failure marks the order's work due,
and the routing worker reroutes it through the same saga.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from google.protobuf.message import Message

from omni.routing.v1 import events_pb2
from omni.routing.v1 import resources_pb2 as pb
from omni.routing.v1 import routing_service_pb2 as service_pb
from omnistock.db import Connection, Pool, unit_of_work
from omnistock.errors import Aborted, AlreadyExists, DomainError, FieldViolation, InvalidArgument
from omnistock.grpc.client import ChannelFactory
from omnistock.idempotency import (
    digest,
    once_in_transaction,
    replayed,
    require_request_id,
    reused,
    store_answer,
    stored_answer,
)
from omnistock.logs import get_logger
from omnistock.messaging import outbox
from omnistock.messaging.envelope import OutgoingEvent
from omnistock.validation import check_id
from services.routing import convert, domain, planner, storage
from services.routing import metrics as m
from services.routing.clients import (
    Availability,
    Hold,
    LedgerClient,
    ReservationClient,
    StockMoved,
)
from services.routing.domain import AllocationStatus, Order, OrderStatus
from services.routing.planner import Method

log = get_logger(__name__)

SCHEMA = "routing"
PRODUCER = "routing"
SUBJECT = "omni.routing"
LEASE = timedelta(seconds=30)
BUSY_WAIT_SECONDS = 3.0
IDEMPOTENCY_ROUTE = "RouteOrder"


class CapacityFull(Exception):
    """Sources filled up between plan and write; plan again without them."""

    def __init__(self, locations: Sequence[str]) -> None:
        super().__init__(f"capacity full at {locations}")
        self.locations = list(locations)


@dataclass(frozen=True)
class Planned:
    """A plan and the holds placed for it."""

    plan: planner.Plan
    allocations: tuple[domain.Allocation, ...]
    new_hold: Hold | None
    replans: int
    # What the plan was made with: the keeping transaction counts capacity by it.
    locations: Mapping[str, planner.Location]
    rules: planner.Rules


# An order RouteOrder just kept, with the availability, locations and rules it
# read while checking it: the first pass starts from them.
Fresh = tuple[Order, Availability, Mapping[str, planner.Location], planner.Rules]


class Catalog:
    """Locations and rules, cached per replica and reloaded when their version moves."""

    def __init__(self) -> None:
        self._network_version = -1
        self._locations: dict[str, planner.Location] = {}
        self._rules_version = -1
        self._rules = planner.Rules()
        self._rules_at: datetime | None = None

    async def load(self, conn: Connection) -> tuple[dict[str, planner.Location], planner.Rules]:
        """The locations and rules in force (two cheap reads when nothing changed)."""
        version = await storage.network_version(conn)
        if version != self._network_version:
            self._locations = await storage.load_locations(conn)
            self._network_version = version
        rules_version = await storage.rules_version(conn)
        if rules_version != self._rules_version:
            self._rules, self._rules_at = await storage.load_rules(conn)
            self._rules_version = rules_version
        return self._locations, self._rules

    @property
    def rules_set_at(self) -> datetime | None:
        """When the cached rules were set."""
        return self._rules_at


def _today(rules: planner.Rules, now: datetime) -> date:
    return now.astimezone(ZoneInfo(rules.time_zone)).date()


class RoutingHandlers:
    """The routing service's use cases."""

    def __init__(
        self, pool: Pool, *, reservation_target: str, ledger_target: str, channels: ChannelFactory
    ) -> None:
        self.pool = pool
        self.reservations = ReservationClient(reservation_target, channels)
        self.ledger = LedgerClient(ledger_target, channels)
        self.catalog = Catalog()

    async def close(self) -> None:
        """Close the channels to other services."""
        await self.reservations.close()
        await self.ledger.close()

    async def _network(self) -> tuple[dict[str, planner.Location], planner.Rules]:
        async with self.pool.acquire() as conn:
            return await self.catalog.load(conn)

    # -- RouteOrder ---------------------------------------------------------------------

    async def route_order(self, request: service_pb.RouteOrderRequest) -> pb.Order:
        """Plan, hold and keep an order (idempotent on ``request_id``)."""
        try:
            order = await self._route_order(request)
        except DomainError as error:
            outcome = "invalid" if isinstance(error, InvalidArgument) else "conflict"
            m.ROUTE_OUTCOMES.labels(outcome).inc()
            raise
        return order

    async def _route_order(self, request: service_pb.RouteOrderRequest) -> pb.Order:
        require_request_id(request.request_id)
        given = convert.order_in(request)
        domain.check_order(given, needs_id=True)
        content = request.SerializeToString(deterministic=True)
        request_digest = digest(content)
        async with self.pool.acquire() as conn:
            answer = await stored_answer(
                conn, schema=SCHEMA, method=IDEMPOTENCY_ROUTE, request_id=request.request_id
            )
            locations, rules = await self.catalog.load(conn)
        if answer is not None:
            return self._replay(answer, request_digest, request.request_id)
        domain.check_pickup_store(given, locations)
        await self._check_cart(given)
        # Asking for availability checks the channel and SKUs before anything is
        # kept; the answer is the first plan's too.
        availability = await self.reservations.availability(
            given.channel, [line.sku for line in given.lines]
        )
        order = Order(
            order_id=given.order_id,
            channel=given.channel,
            method=given.method or Method.SHIP_TO_HOME,
            customer=given.customer,
            lines=tuple(
                domain.OrderLine(i, line.sku, line.quantity)
                for i, line in enumerate(given.lines, start=1)
            ),
            status=OrderStatus.ROUTING,
            allow_split=given.allow_split,
            deliver_by=given.deliver_by,
            cart_reservation_id=given.cart_reservation_id,
        )
        token = uuid.uuid4()

        async def keep(conn: Connection) -> bool:
            return await storage.insert_order(
                conn, order, request=content, request_id=request.request_id,
                lease_token=token, lease=LEASE,
            )  # fmt: skip

        if not await unit_of_work(self.pool, keep):
            return await self._existing(request, request_digest, token)
        return await self._attended_pass(
            order.order_id,
            token,
            answer=(request.request_id, request_digest),
            fresh=(order, availability, locations, rules),
        )

    async def _attended_pass(
        self,
        order_id: str,
        token: uuid.UUID,
        *,
        answer: tuple[str, bytes],
        fresh: Fresh | None = None,
    ) -> pb.Order:
        """A routing pass a caller waits for. If it fails, the lease goes at once
        so the caller's retry can take over; the work stays due, so the routing
        worker finishes it if no retry comes."""
        try:
            return await self._route_pass(order_id, token, answer=answer, fresh=fresh)
        except BaseException:
            async with self.pool.acquire() as conn:
                await storage.drop_lease(conn, order_id, token)
            raise

    def _replay(
        self, answer: tuple[bytes, bytes], request_digest: bytes, request_id: str
    ) -> pb.Order:
        response = replayed(answer, request_digest, IDEMPOTENCY_ROUTE, request_id)
        m.ROUTE_OUTCOMES.labels("replayed").inc()
        return service_pb.RouteOrderResponse.FromString(response).order

    async def _existing(
        self, request: service_pb.RouteOrderRequest, request_digest: bytes, token: uuid.UUID
    ) -> pb.Order:
        """The order id is taken: a retry of an interrupted first routing, or a clash."""
        async with self.pool.acquire() as conn:
            stored = await storage.load_order(conn, request.order_id)
            answer = await stored_answer(
                conn, schema=SCHEMA, method=IDEMPOTENCY_ROUTE, request_id=request.request_id
            )
        if answer is not None:
            return self._replay(answer, request_digest, request.request_id)
        if stored is None or stored.request_id != request.request_id:
            raise AlreadyExists(
                "ORDER_EXISTS",
                f"Order {request.order_id} was routed before by another request; "
                "use GetOrder, or a new order id.",
                {"order_id": request.order_id},
            )
        if digest(stored.request) != request_digest:
            raise reused(IDEMPOTENCY_ROUTE, request.request_id)
        await self._lease(request.order_id, token)
        return await self._attended_pass(
            request.order_id, token, answer=(request.request_id, request_digest)
        )

    async def _lease(self, order_id: str, token: uuid.UUID) -> None:
        """Take the order's lease, waiting briefly for another pass to finish."""
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while True:
            async with self.pool.acquire() as conn:
                if await storage.take_lease(conn, order_id, token, LEASE):
                    return
            if time.monotonic() > deadline:
                raise Aborted(
                    "ORDER_BUSY",
                    f"Order {order_id} is being changed by another request; retry shortly.",
                    {"order_id": order_id},
                )
            await asyncio.sleep(0.05)

    async def _check_cart(self, given: domain.OrderInput) -> None:
        if not given.cart_reservation_id:
            return
        cart = await self.reservations.get(given.cart_reservation_id)
        if cart is None or cart.channel != given.channel:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "cart_reservation_id",
                        f"no cart hold {given.cart_reservation_id!r} for channel {given.channel}",
                    )
                ]
            )

    # -- the routing pass (first routing, resumption, reroute) ---------------------------

    async def _route_pass(
        self,
        order_id: str,
        token: uuid.UUID,
        *,
        answer: tuple[str, bytes] | None = None,
        fresh: Fresh | None = None,
    ) -> pb.Order:
        """Plan and hold the order's open need, then keep the result (see module doc).

        ``fresh`` is an order this call just kept, with what it read to check it.
        """
        availability: Availability | None = None
        network: tuple[Mapping[str, planner.Location], planner.Rules] | None = None
        if fresh is not None:
            order, availability, fresh_locations, fresh_rules = fresh
            network = (fresh_locations, fresh_rules)
        else:
            async with self.pool.acquire() as conn:
                stored = await storage.load_order(conn, order_id)
            if stored is None:
                raise domain.not_found(order_id)
            order = stored.order
            # An interrupted pass may have left holds behind.
            await self._release_orphans(order)
        first = order.plan_number == 0
        full: set[str] = set()
        while True:
            needs = domain.open_needs(order)
            planned = (
                await self._plan_and_hold(
                    order, needs, full, first=first, known=availability, network=network
                )
                if needs
                else None
            )
            availability = None
            try:
                return await unit_of_work(
                    self.pool,
                    lambda conn, planned=planned: self._keep(  # type: ignore[misc]
                        conn, order_id, token, order, planned, answer
                    ),
                )
            except CapacityFull as error:
                if planned is not None and planned.new_hold is not None:
                    await self._release_hold(planned.new_hold, "CAPACITY_FULL")
                full.update(error.locations)
                m.REPLANS.labels("capacity").inc()

    async def _release_orphans(self, order: Order) -> None:
        """Let go of hold lines of the order that no live allocation stands for."""
        live = {
            (a.reservation_id, a.reservation_line)
            for a in order.allocations
            if a.status
            in (AllocationStatus.HELD, AllocationStatus.SHIPPED, AllocationStatus.COLLECTED)
        }
        arrived = domain.transferred_to_pickup(order)
        for hold in await self.reservations.active_for(order.channel, order.order_id):
            stray = []
            for line in hold.lines:
                if (hold.reservation_id, line.line_number) in live:
                    continue
                key = (line.sku, line.location_id)
                if arrived.get(key, 0) >= line.held:
                    arrived[key] -= line.held  # goods a transfer brought, awaiting collection
                    continue
                stray.append(line.line_number)
            if stray:
                log.info(
                    "releasing stray holds",
                    order_id=order.order_id,
                    reservation_id=hold.reservation_id,
                    lines=stray,
                )
                await self.reservations.release(
                    f"{order.order_id}:stray:{hold.reservation_id}:{uuid.uuid4().hex[:8]}",
                    hold.reservation_id,
                    stray,
                    "ROUTING_CLEANUP",
                )

    async def _release_hold(self, hold: Hold, reason: str) -> None:
        await self.reservations.release(
            f"release:{hold.reservation_id}", hold.reservation_id, [], reason
        )

    async def _plan_and_hold(
        self,
        order: Order,
        needs: tuple[planner.Need, ...],
        full: set[str],
        *,
        first: bool,
        known: Availability | None = None,
        network: tuple[Mapping[str, planner.Location], planner.Rules] | None = None,
    ) -> Planned:
        """Plan ``needs`` and hold the plan, planning again while stock moves."""
        locations, rules = network or await self._network()
        skus = [n.sku for n in needs]
        replans = 0
        cart = await self._usable_cart(order) if first else None
        while True:
            now = datetime.now(UTC)
            availability = known or await self.reservations.availability(order.channel, skus)
            known = None
            units = dict(availability.units)
            for line in cart.lines if cart else ():
                units[(line.sku, line.location_id)] = (
                    units.get((line.sku, line.location_id), 0) + line.held
                )
            facts = planner.Network(
                locations=locations,
                available=units,
                sellable=availability.sellable | {loc for _, loc in units},
                capacity_left=await self._capacity_left(locations, rules, now, full),
                failed=frozenset(order.failed),
            )
            plan = self._plan(order, needs, facts, rules, now)
            if not plan.shipments:
                if cart is not None:
                    await self._release_hold(cart, "NOT_NEEDED")
                return Planned(plan, (), None, replans, locations, rules)
            kept, residual = _split_cart(cart, _wanted(plan.shipments))
            try:
                if cart is not None:
                    drop = [line.line_number for line in cart.lines if line.line_number not in kept]
                    if drop:
                        await self.reservations.release(
                            f"{order.order_id}:cart:{uuid.uuid4().hex[:8]}",
                            cart.reservation_id, drop, "NOT_NEEDED",
                        )  # fmt: skip
                new_hold = (
                    await self.reservations.reserve(
                        f"{order.order_id}:hold:{uuid.uuid4().hex}",
                        order.channel,
                        order.order_id,
                        residual,
                    )
                    if residual
                    else None
                )
            except StockMoved as moved:
                replans += 1
                m.REPLANS.labels("stock_moved").inc()
                if cart is not None:
                    cart = await self._usable_cart(order)
                if replans > rules.max_replans:
                    # Give up on the lines that keep moving; hold the rest.
                    return await self._hold_what_stays(
                        order, plan, moved, locations, rules, replans
                    )
                continue
            converted = None
            if cart is not None and kept:
                converted = await self.reservations.convert(
                    f"{order.order_id}:convert", cart.reservation_id, order.order_id
                )
                if converted is None:  # the cart expired meanwhile: plan again without it
                    if new_hold is not None:
                        await self._release_hold(new_hold, "CART_ENDED")
                    cart = None
                    replans += 1
                    continue
            allocations = _allocations(plan, order.plan_number + 1, new_hold, converted, kept)
            return Planned(plan, allocations, new_hold, replans, locations, rules)

    async def _hold_what_stays(
        self,
        order: Order,
        plan: planner.Plan,
        moved: StockMoved,
        locations: Mapping[str, planner.Location],
        rules: planner.Rules,
        replans: int,
    ) -> Planned:
        """After ``max_replans``: hold what did not move, report the rest unsourced."""
        short = set(moved.short)
        shipments = []
        unsourced = list(plan.unsourced)
        for s in plan.shipments:
            keep = tuple(line for line in s.lines if (line.sku, s.source_id) not in short)
            for line in s.lines:
                if (line.sku, s.source_id) in short:
                    unsourced.append(
                        planner.Unsourced(
                            line.line_number, line.sku, line.quantity,
                            f"stock kept moving at {s.source_id}; gave up after {replans} plans",
                        )
                    )  # fmt: skip
            if keep:
                shipments.append(replace(s, lines=keep))
        plan = replace(
            plan,
            shipments=tuple(shipments),
            unsourced=tuple(sorted(unsourced, key=lambda u: u.line_number)),
            total_cost_cents=sum(s.cost_cents for s in shipments),
        )
        wanted = _wanted(shipments)
        hold = None
        if wanted:
            try:
                hold = await self.reservations.reserve(
                    f"{order.order_id}:hold:{uuid.uuid4().hex}",
                    order.channel,
                    order.order_id,
                    wanted,
                )
            except StockMoved:
                plan = replace(
                    plan,
                    shipments=(),
                    total_cost_cents=0,
                    unsourced=tuple(
                        planner.Unsourced(n.line_number, n.sku, n.quantity, "stock kept moving")
                        for n in domain.open_needs(order)
                    ),
                )
                return Planned(plan, (), None, replans, locations, rules)
        allocations = _allocations(plan, order.plan_number + 1, hold, None, {})
        return Planned(plan, allocations, hold, replans, locations, rules)

    async def _usable_cart(self, order: Order) -> Hold | None:
        if not order.cart_reservation_id:
            return None
        cart = await self.reservations.get(order.cart_reservation_id)
        if cart is None or not cart.active or cart.channel != order.channel:
            return None
        return cart

    async def _capacity_left(
        self,
        locations: Mapping[str, planner.Location],
        rules: planner.Rules,
        now: datetime,
        full: set[str],
    ) -> dict[str, int]:
        limited = {
            loc_id: loc.daily_capacity for loc_id, loc in locations.items() if loc.daily_capacity
        }
        async with self.pool.acquire() as conn:
            used = await storage.capacity_used(conn, limited, _today(rules, now))
        left = {loc_id: cap - used.get(loc_id, 0) for loc_id, cap in limited.items()}
        for loc_id in full:
            left[loc_id] = 0
        return left

    def _plan(
        self,
        order: Order,
        needs: tuple[planner.Need, ...],
        network: planner.Network,
        rules: planner.Rules,
        now: datetime,
    ) -> planner.Plan:
        problem = planner.Problem(
            channel=order.channel,
            method=order.method,
            needs=needs,
            now=now,
            destination=order.customer.position,
            pickup_location_id=order.customer.pickup_location_id,
            allow_split=order.allow_split,
            deliver_by=order.deliver_by,
        )
        started = time.perf_counter()
        plan = planner.plan(problem, network, rules)
        m.PLAN_SECONDS.labels(order.method.value).observe(time.perf_counter() - started)
        m.PLANNED_SHIPMENTS.observe(len(plan.shipments))
        if not plan.exhaustive:
            m.SEARCH_TRUNCATED.inc()
        return plan

    async def _keep(
        self,
        conn: Connection,
        order_id: str,
        token: uuid.UUID,
        before: Order,
        planned: Planned | None,
        answer: tuple[str, bytes] | None,
    ) -> pb.Order:
        """The pass's one transaction: capacity, allocations, plan, events, answer."""
        stored = await storage.load_order(conn, order_id, lock=True)
        if stored is None or stored.lease_token != token:
            if planned is not None and planned.new_hold is not None:
                # Another pass took over: this pass's hold is a stray it will release.
                log.warning("lost the order's lease", order_id=order_id)
            raise Aborted(
                "ORDER_BUSY",
                f"Order {order_id} was taken over by another routing pass; retry shortly.",
                {"order_id": order_id},
            )
        order = stored.order
        now = datetime.now(UTC)
        first = order.plan_number == 0
        plan_bytes = None
        plan_pb: pb.Plan | None = None
        events: list[OutgoingEvent] = []
        if planned is not None:
            locations, rules = planned.locations, planned.rules
            sources = {a.location_id for a in planned.allocations}
            limited = {
                s: locations[s].daily_capacity for s in sources if locations[s].daily_capacity
            }
            full = await storage.take_capacity(conn, order_id, limited, _today(rules, now))
            if full:
                raise CapacityFull(full)
            number = order.plan_number + 1
            plan_pb = convert.plan_out(
                planned.plan, plan_number=number, planned_at=now, replans=planned.replans
            )
            plan_bytes = plan_pb.SerializeToString()
            unsourced = planned.plan.unsourced
            order = replace(
                order,
                plan_number=number,
                allocations=order.allocations + planned.allocations,
                attention_reason="; ".join(f"line {u.line_number}: {u.reason}" for u in unsourced),
            )
        # Failures recorded while this pass ran are the next pass's work.
        more_work = set(order.failed) - set(before.failed)
        order = domain.settle(order, now)
        if more_work:
            order = replace(order, status=OrderStatus.ROUTING)
        await storage.save_order(
            conn, order, plan=plan_bytes, work_due=bool(more_work), release_lease=True,
            reroute_cause=None,
        )  # fmt: skip
        # Returns need delivered units, so a first routing has none to show.
        returns = [] if first else await storage.load_returns(conn, order_id)
        out = convert.order_out(order, plan_pb or stored.plan, returns)
        if planned is not None:
            events += self._routing_events(out, first, stored.reroute_cause, planned)
        await outbox.append(conn, SCHEMA, PRODUCER, events)
        if answer is not None:
            response = service_pb.RouteOrderResponse(order=out).SerializeToString()
            await store_answer(
                conn,
                schema=SCHEMA,
                method=IDEMPOTENCY_ROUTE,
                request_id=answer[0],
                request_digest=answer[1],
                answer=response,
            )
        if first and planned is not None:
            outcome = (
                "unsourced" if not planned.plan.shipments
                else "partial" if planned.plan.unsourced else "routed"
            )  # fmt: skip
            m.ROUTE_OUTCOMES.labels(outcome).inc()
        return out

    def _routing_events(
        self, order: pb.Order, first: bool, cause: str, planned: Planned
    ) -> list[OutgoingEvent]:
        slim = pb.Order()
        slim.CopyFrom(order)
        del slim.plan.candidates[:]  # the reasons are for GetOrder, not for every consumer
        events: list[OutgoingEvent] = []
        if first:
            events.append(
                _event("order.routed", events_pb2.OrderRouted(order=slim), order.order_id)
            )
        else:
            m.REROUTES.labels(cause.lower() or "unknown").inc()
            events.append(
                _event(
                    "order.rerouted",
                    events_pb2.OrderRerouted(
                        order=slim, failed_location_ids=order.failed_location_ids, cause=cause
                    ),
                    order.order_id,
                )
            )
        if planned.plan.unsourced:
            m.NEEDS_ATTENTION.inc()
            events.append(
                _event(
                    "order.needs_attention",
                    events_pb2.OrderNeedsAttention(
                        order=slim, unsourced=slim.plan.unsourced, reason=order.attention_reason
                    ),
                    order.order_id,
                )
            )
        return events

    # -- QuoteOrder -----------------------------------------------------------------------

    async def quote_order(self, request: service_pb.QuoteOrderRequest) -> pb.Plan:
        """The plan routing would make now; nothing is held or kept."""
        given = convert.order_in(request)
        try:
            domain.check_order(given, needs_id=False)
            locations, rules = await self._network()
            domain.check_pickup_store(given, locations)
            await self._check_cart(given)
            skus = [line.sku for line in given.lines]
            availability = await self.reservations.availability(given.channel, skus)
        except InvalidArgument:
            m.QUOTES.labels("invalid").inc()
            raise
        units = dict(availability.units)
        if given.cart_reservation_id:
            cart = await self.reservations.get(given.cart_reservation_id)
            for line in cart.lines if cart and cart.active else ():
                units[(line.sku, line.location_id)] = (
                    units.get((line.sku, line.location_id), 0) + line.held
                )
        now = datetime.now(UTC)
        order = Order(
            order_id="quote",
            channel=given.channel,
            method=given.method or Method.SHIP_TO_HOME,
            customer=given.customer,
            lines=(),
            status=OrderStatus.ROUTING,
            allow_split=given.allow_split,
            deliver_by=given.deliver_by,
        )
        needs = tuple(
            planner.Need(i, line.sku, line.quantity) for i, line in enumerate(given.lines, start=1)
        )
        network = planner.Network(
            locations=locations,
            available=units,
            sellable=availability.sellable | {loc for _, loc in units},
            capacity_left=await self._capacity_left(locations, rules, now, set()),
        )
        plan = self._plan(order, needs, network, rules, now)
        outcome = "unsourced" if not plan.shipments else "partial" if plan.unsourced else "sourced"
        m.QUOTES.labels(outcome).inc()
        return convert.plan_out(plan, plan_number=0, planned_at=now, replans=0)

    # -- GetOrder -------------------------------------------------------------------------

    async def get_order(self, order_id: str) -> pb.Order:
        """An order as kept now."""
        problems = check_id(order_id, "order_id", "the order id")
        if problems:
            raise InvalidArgument(problems)
        async with self.pool.acquire() as conn:
            stored = await storage.load_order(conn, order_id)
            if stored is None:
                raise domain.not_found(order_id)
            returns = await storage.load_returns(conn, order_id)
        return convert.order_out(stored.order, stored.plan, returns)

    # -- CancelOrder ----------------------------------------------------------------------

    async def cancel_order(
        self, request_id: str, order_id: str, line_numbers: Sequence[int], reason_code: str
    ) -> pb.Order:
        """Cancel open units of some lines (or all): release their holds, tell fulfilment."""
        require_request_id(request_id)
        problems = check_id(order_id, "order_id", "the order id")
        if problems:
            raise InvalidArgument(problems)
        request_digest = digest(repr((order_id, sorted(line_numbers), reason_code)).encode())
        method = "CancelOrder"
        async with self.pool.acquire() as conn:
            answer = await stored_answer(conn, schema=SCHEMA, method=method, request_id=request_id)
            stored = await storage.load_order(conn, order_id)
        if answer is not None:
            response = replayed(answer, request_digest, method, request_id)
            return service_pb.CancelOrderResponse.FromString(response).order
        if stored is None:
            raise domain.not_found(order_id)
        domain.check_cancel(stored.order, line_numbers, reason_code)
        token = uuid.uuid4()
        await self._lease(order_id, token)
        try:
            return await self._cancel(
                request_id, request_digest, order_id, token, line_numbers, reason_code
            )
        finally:
            async with self.pool.acquire() as conn:
                await storage.drop_lease(conn, order_id, token)

    async def _cancel(
        self,
        request_id: str,
        request_digest: bytes,
        order_id: str,
        token: uuid.UUID,
        line_numbers: Sequence[int],
        reason_code: str,
    ) -> pb.Order:
        async with self.pool.acquire() as conn:
            stored = await storage.load_order(conn, order_id)
        assert stored is not None
        chosen = domain.check_cancel(stored.order, line_numbers, reason_code)
        _, cancelled = domain.cancel_lines(stored.order, chosen, new_ids())
        by_hold: dict[str, list[int]] = {}
        for a in cancelled:
            # A transfer that left its source used its hold there; the goods'
            # hold at the pickup store ends with the transfer's cancellation.
            if a.fulfilled < a.quantity:
                by_hold.setdefault(a.reservation_id, []).append(a.reservation_line)
        for reservation_id, lines in sorted(by_hold.items()):
            await self.reservations.release(
                f"{request_id}:{reservation_id}", reservation_id, sorted(set(lines)), reason_code
            )

        async def keep(conn: Connection) -> pb.Order:
            fresh = await storage.load_order(conn, order_id, lock=True)
            assert fresh is not None
            order, gone = domain.cancel_lines(fresh.order, chosen, new_ids())
            order = domain.settle(order, datetime.now(UTC))
            # A routing pass tidies up after the cancel: holds an interrupted
            # pass left behind are released, a pending first routing settles.
            await storage.save_order(
                conn, order, work_due=fresh.order.status is OrderStatus.ROUTING
            )
            out = convert.order_out(order, fresh.plan, await storage.load_returns(conn, order_id))
            event = events_pb2.OrderCancelled(
                order=out,
                line_numbers=chosen,
                reason_code=reason_code,
                cancelled_allocations=[convert.allocation_out(a) for a in gone],
            )
            del event.order.plan.candidates[:]
            await outbox.append(
                conn, SCHEMA, PRODUCER, [_event("order.cancelled", event, order_id)]
            )
            response = service_pb.CancelOrderResponse(order=out).SerializeToString()
            await store_answer(
                conn,
                schema=SCHEMA,
                method="CancelOrder",
                request_id=request_id,
                request_digest=request_digest,
                answer=response,
            )
            return out

        out = await unit_of_work(self.pool, keep)
        m.CANCELLED_LINES.inc(len(chosen))
        return out

    # -- RouteReturn ----------------------------------------------------------------------

    async def route_return(self, request: service_pb.RouteReturnRequest) -> pb.OrderReturn:
        """Decide and record what happens to returned units; the ledger posts them."""
        require_request_id(request.request_id)
        lines = convert.return_lines_in(request)
        domain.check_return_request(request.return_id, request.order_id, request.location_id, lines)
        request_digest = digest(request.SerializeToString(deterministic=True))
        method = "RouteReturn"
        async with self.pool.acquire() as conn:
            answer = await stored_answer(
                conn, schema=SCHEMA, method=method, request_id=request.request_id
            )
            locations, _ = await self.catalog.load(conn)
        if answer is not None:
            # Answered before: no need to ask the ledger again.
            response = replayed(answer, request_digest, method, request.request_id)
            return service_pb.RouteReturnResponse.FromString(response).order_return
        store = domain.check_return_store(request.location_id, locations)
        carried = await self.ledger.carried(store.location_id, sorted({line.sku for line in lines}))

        async def keep(conn: Connection) -> pb.OrderReturn:
            stored = await storage.load_order(conn, request.order_id, lock=True)
            if stored is None:
                raise domain.not_found(request.order_id)
            matched = domain.match_return(stored.order, lines)
            returned = []
            for number, (line_number, line) in enumerate(matched, start=1):
                assert line.condition is not None
                disposition, destination, why = domain.dispose(
                    line.condition, line.sku in carried, store, locations
                )
                transfer = (
                    f"{request.return_id}/{number}"
                    if disposition is domain.Disposition.SEND_TO_DISTRIBUTION_CENTRE
                    else ""
                )
                returned.append(
                    domain.ReturnedLine(
                        line_number,
                        line.sku,
                        line.quantity,
                        line.condition,
                        disposition,
                        destination,
                        transfer,
                        why,
                    )
                )
            record = domain.OrderReturn(
                request.return_id, request.order_id, store.location_id, tuple(returned),
                datetime.now(UTC),
            )  # fmt: skip
            body = convert.return_out(record)
            if not await storage.insert_return(conn, record, body.SerializeToString()):
                raise AlreadyExists(
                    "RETURN_EXISTS",
                    f"Return {request.return_id} was routed before by another request.",
                    {"return_id": request.return_id},
                )
            order = domain.record_return(stored.order, returned)
            await storage.save_order(conn, domain.settle(order, datetime.now(UTC)))
            event = events_pb2.ReturnRouted(order_return=body, channel=order.channel)
            await outbox.append(
                conn, SCHEMA, PRODUCER, [_event("return.routed", event, request.order_id)]
            )
            response = service_pb.RouteReturnResponse(order_return=body).SerializeToString()
            await store_answer(
                conn,
                schema=SCHEMA,
                method=method,
                request_id=request.request_id,
                request_digest=request_digest,
                answer=response,
            )
            for done in returned:
                m.RETURNS.labels(done.disposition.value).inc(done.quantity)
            return body

        return await unit_of_work(self.pool, keep)

    # -- rules ----------------------------------------------------------------------------

    async def get_rules(self) -> pb.RoutingRules:
        """The rules in force."""
        _, rules = await self._network()
        return convert.rules_out(rules, self.catalog.rules_set_at)

    async def set_rules(self, request_id: str, given: pb.RoutingRules) -> pb.RoutingRules:
        """Keep new rules as the next version."""
        require_request_id(request_id)
        rules = convert.rules_in(given)
        locations, _ = await self._network()
        domain.check_rules(rules, locations)

        async def keep(conn: Connection) -> pb.RoutingRules:
            version, at = await storage.save_rules(conn, rules)
            return convert.rules_out(replace(rules, version=version), at)

        return await once_in_transaction(
            self.pool,
            schema=SCHEMA,
            method="SetRoutingRules",
            request_id=request_id,
            content=convert.rules_to_json(rules).encode(),
            execute=keep,
            encode=lambda out: out.SerializeToString(),
            decode=pb.RoutingRules.FromString,
        )

    # -- facts from other services (inside the consumers' transactions) ------------------

    async def apply_location(self, conn: Connection, location: planner.Location) -> None:
        """A location the ledger announced."""
        await storage.upsert_location(conn, location)

    async def apply_fact(
        self,
        conn: Connection,
        order_id: str,
        change: Callable[[Order], Order],
        *,
        cause: str = "",
    ) -> None:
        """Change an order as a fulfilment or reservation fact says; failures make work."""
        stored = await storage.load_order(conn, order_id, lock=True)
        if stored is None:
            log.warning("fact for an unknown order", order_id=order_id)
            return
        before = stored.order
        order = change(before)
        if order == before:
            return
        failed = set(order.failed) - set(before.failed)
        now = datetime.now(UTC)
        # An order already ROUTING has a pass running or due; a later fact (the
        # picked part of a short pick shipping) must not take that work away.
        pending = before.status is OrderStatus.ROUTING
        if failed:
            # Units to route again: the routing worker takes it from here.
            order = replace(order, status=OrderStatus.ROUTING, updated_at=now)
        elif not pending:
            order = domain.settle(order, now)
        await storage.save_order(
            conn,
            order,
            work_due=bool(failed) or pending or _stray_lines(order),
            reroute_cause=cause if failed else None,
        )

    # -- the routing worker ---------------------------------------------------------------

    async def work_due(self, batch: int) -> int:
        """Route orders whose work is due (interrupted routings, failed sources)."""
        async with self.pool.acquire() as conn:
            claimed = await storage.claim_due(conn, batch, LEASE)
        for order_id, token in claimed:
            try:
                await self._route_pass(order_id, token)
            except DomainError as error:
                log.warning("routing pass failed", order_id=order_id, reason=error.reason)
        return len(claimed)

    async def refresh_gauges(self) -> None:
        """Orders needing attention now."""
        async with self.pool.acquire() as conn:
            m.ORDERS_NEEDING_ATTENTION.set(await storage.orders_needing_attention(conn))


def _stray_lines(order: Order) -> bool:
    """Does an allocation that ended leave a hold line no live allocation stands for?"""
    live = {
        (a.reservation_id, a.reservation_line)
        for a in order.allocations
        if a.status in (AllocationStatus.HELD, AllocationStatus.SHIPPED, AllocationStatus.COLLECTED)
    }
    return any(
        (a.reservation_id, a.reservation_line) not in live
        for a in order.allocations
        if a.status in (AllocationStatus.FAILED, AllocationStatus.EXPIRED)
    )


def new_ids() -> Iterator[str]:
    """Fresh allocation ids, as many as a change needs."""
    while True:
        yield str(uuid.uuid4())


def _wanted(shipments: Sequence[planner.Shipment]) -> dict[tuple[str, str], int]:
    """Units to hold per (sku, source) for ``shipments``."""
    wanted: dict[tuple[str, str], int] = {}
    for shipment in shipments:
        for line in shipment.lines:
            key = (line.sku, shipment.source_id)
            wanted[key] = wanted.get(key, 0) + line.quantity
    return wanted


def _split_cart(
    cart: Hold | None, wanted: dict[tuple[str, str], int]
) -> tuple[dict[int, int], dict[tuple[str, str], int]]:
    """Cart lines the plan uses whole ({line: units}), and what must be newly held."""
    residual = dict(wanted)
    kept: dict[int, int] = {}
    for line in cart.lines if cart else ():
        key = (line.sku, line.location_id)
        if residual.get(key, 0) >= line.held:
            kept[line.line_number] = line.held
            residual[key] -= line.held
            if residual[key] == 0:
                del residual[key]
    return kept, residual


def _allocations(
    plan: planner.Plan,
    plan_number: int,
    hold: Hold | None,
    cart: Hold | None,
    kept: dict[int, int],
) -> tuple[domain.Allocation, ...]:
    """Allocations for the plan's lines, each pointing at the hold line behind it."""
    # Units available per (sku, location) in each hold line, consumed in order.
    pools: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    for line in cart.lines if cart else ():
        if line.line_number in kept:
            pools.setdefault((line.sku, line.location_id), []).append(
                (cart.reservation_id if cart else "", line.line_number, kept[line.line_number])
            )
    for line in hold.lines if hold else ():
        pools.setdefault((line.sku, line.location_id), []).append(
            (hold.reservation_id if hold else "", line.line_number, line.held)
        )
    out: list[domain.Allocation] = []
    for shipment in plan.shipments:
        for planned_line in shipment.lines:
            left = planned_line.quantity
            pool = pools.get((planned_line.sku, shipment.source_id), [])
            while left and pool:
                reservation_id, number, units = pool[0]
                take = min(left, units)
                out.append(
                    domain.Allocation(
                        allocation_id=str(uuid.uuid4()),
                        line_number=planned_line.line_number,
                        sku=planned_line.sku,
                        location_id=shipment.source_id,
                        quantity=take,
                        type=shipment.type,
                        pickup_location_id=shipment.pickup_location_id,
                        reservation_id=reservation_id,
                        reservation_line=number,
                        status=AllocationStatus.HELD,
                        plan_number=plan_number,
                    )
                )
                left -= take
                if take == units:
                    pool.pop(0)
                else:
                    pool[0] = (reservation_id, number, units - take)
    return tuple(out)


def _event(name: str, payload: Message, key: str) -> OutgoingEvent:
    return OutgoingEvent(f"{SUBJECT}.{name}", payload, key)
