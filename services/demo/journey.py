"""The omnichannel journey: one customer's path through every service, told as it happens.

``omni demo journey`` (``make demo``) plays it over gRPC against a running
system loaded with the demo network (``omni dev run`` loads
deploy/demo/network.yaml), printing what each service answers:

1. a jacket seen on social media goes into a cart (a cart hold);
2. the next day, on a laptop, the cart is still there (the hold is extended)
   and the customer watches the jacket's availability live;
3. stock in their colour drops (a sale at the till, another shopper's cart)
   and the live stream flags "only a few left", then sold out;
4. checkout as click-and-collect at that sold-out store: routing plans a
   transfer from a distribution centre, whose staff accept, pick, pack and
   ship it; the store receives it (the jacket is held there for the order),
   marks it ready (the pickup code reaches the customer in
   FulfilmentReadyForPickup) and hands it over against the code;
5. a second jacket, for the customer's brother, ships from the store nearest
   to him that has it;
6. he returns it at another store, where it goes back on sale;
7. the ledger audit passes, every hold of the journey ended (consumed or
   released), and every channel's availability equals on-hand - held -
   safety stock.

Every run uses fresh ids (carts, orders, requests, scanner keys), so it can run
again on the same stack; it posts the stock the story needs (a count at the
pickup store, deliveries where there is too little). Asynchronous effects are
awaited with a timeout, and a failure names the step and what did not happen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC
from typing import TypeAlias, TypeVar

import asyncpg
import grpc
import nats
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2, types_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as fulfilment_grpc
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import ledger_service_pb2_grpc as ledger_grpc
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omni.routing.v1 import routing_service_pb2_grpc as routing_grpc
from omnistock.devstack.stack import embedded_database_url
from omnistock.geo import haversine_km
from omnistock.grpc.client import ChannelFactory
from omnistock.messaging.envelope import unpack
from omnistock.nats_client import connect_options
from omnistock.settings import Settings
from services.ledger.audit import audit

LedgerStub: TypeAlias = "ledger_grpc.StockLedgerServiceAsyncStub"
ReservationStub: TypeAlias = "reservation_grpc.ReservationServiceAsyncStub"
RoutingStub: TypeAlias = "routing_grpc.OrderRoutingServiceAsyncStub"
FulfilmentStub: TypeAlias = "fulfilment_grpc.FulfilmentServiceAsyncStub"
T = TypeVar("T")

# The story's cast, all from deploy/demo/network.yaml.
PRODUCT = "JKT-RAIN"
SKU = "JKT-RAIN-OLV-M"  # the packable rain jacket in olive, size M
CHANNEL = "web"  # the customer's shop, on the phone and on the laptop
OTHER_CHANNEL = "app"  # another shopper
PICKUP_STORE = "store-maastricht"  # the customer's store, which sells out
CART_DC = "dc-venlo"  # the distribution centre nearest to the customer
BROTHER_STORE = "store-groningen"  # the brother lives around the corner
# How many sell at Maastricht's till while the customer watches; before, the
# store can promise this many more than the web channel's low-stock threshold.
TILL_SALE = 2
CART_TTL = Duration(seconds=24 * 3600)  # a saved cart, kept for a day

READY_SUBJECT = "omni.fulfilment.fulfilment.ready_for_pickup"
FULFILMENT_STREAM = "OMNI_FULFILMENT"
# Holds end as one of these; ACTIVE or SHORT after the journey is a failure.
ENDED_WELL = (
    reservation_res.RESERVATION_STATUS_CONSUMED,
    reservation_res.RESERVATION_STATUS_RELEASED,
)

Say = Callable[[str], None]


class JourneyFailed(Exception):
    """A step of the journey did not go as the story needs; names the step."""

    def __init__(self, step: str, problem: str) -> None:
        super().__init__(f"step {step}: {problem}")
        self.step = step
        self.problem = problem


@dataclass(frozen=True)
class JourneyConfig:
    """Where the services, NATS and the database are, and how long to wait per effect."""

    ledger_target: str
    reservation_target: str
    routing_target: str
    fulfilment_target: str
    nats_url: str
    database_url: str
    # TLS and the token the journey calls with (it plays every role, so the
    # service token).
    channels: ChannelFactory
    timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = 30.0) -> JourneyConfig:
        """The addresses ``settings`` give; without a configured NATS or database,
        the ones a running ``omni dev run`` serves."""
        return cls(
            ledger_target=settings.grpc_target("ledger"),
            reservation_target=settings.grpc_target("reservation"),
            routing_target=settings.grpc_target("routing"),
            fulfilment_target=settings.grpc_target("fulfilment"),
            nats_url=settings.nats_url or f"nats://127.0.0.1:{settings.dev_nats_port}",
            database_url=settings.database_url or embedded_database_url(settings.dev_postgres_port),
            channels=ChannelFactory.from_settings(settings),
            timeout=timeout,
        )


@dataclass
class JourneyResult:
    """What the journey did, for whoever runs it (the e2e test asserts on it)."""

    tag: str
    sku: str
    cart_reservation_id: str = ""
    other_cart_reservation_id: str = ""
    pickup_order_id: str = ""
    transfer_source_id: str = ""
    cart_converted: bool = False
    pickup_code: str = ""
    shipped_order_id: str = ""
    ship_source_id: str = ""
    return_id: str = ""
    return_location_id: str = ""
    low_stock_seen: int = 0
    hold_statuses: dict[str, str] = field(default_factory=dict)
    balances_checked: int = 0


async def run_journey(config: JourneyConfig, say: Say = print) -> JourneyResult:
    """Play the journey against the running services; raises :class:`JourneyFailed`."""
    async with _connected(config) as clients:
        return await Journey(clients, config, say).run()


@dataclass
class _Clients:
    ledger: LedgerStub
    reservations: ReservationStub
    routing: RoutingStub
    fulfilment: FulfilmentStub
    nats: Client


@asynccontextmanager
async def _connected(config: JourneyConfig) -> AsyncIterator[_Clients]:
    async def quiet(_: Exception) -> None:
        """Connection errors surface as the failure below, not as a traceback per try."""

    try:
        # Its own options (fail fast: a demo, not a service), with the configured
        # NATS credentials and TLS like every other connection.
        client = await nats.connect(
            servers=[server.strip() for server in config.nats_url.split(",")],
            name="omnistock-journey",
            connect_timeout=3,
            max_reconnect_attempts=1,
            error_cb=quiet,
            **connect_options(Settings()),
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as error:
        raise JourneyFailed(
            "0. getting ready",
            f"cannot reach NATS at {config.nats_url} ({error!r}); is `make run` running?",
        ) from error
    try:
        async with (
            config.channels.open(config.ledger_target) as ledger,
            config.channels.open(config.reservation_target) as reservation,
            config.channels.open(config.routing_target) as routing,
            config.channels.open(config.fulfilment_target) as fulfilment,
        ):
            yield _Clients(
                ledger_grpc.StockLedgerServiceStub(ledger),
                reservation_grpc.ReservationServiceStub(reservation),
                routing_grpc.OrderRoutingServiceStub(routing),
                fulfilment_grpc.FulfilmentServiceStub(fulfilment),
                client,
            )
    finally:
        await client.close()


def _when(stamp: Timestamp) -> str:
    return f"{stamp.ToDatetime(tzinfo=UTC):%a %d %b %H:%M} UTC"


def _name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix).replace("_", " ").lower()


def _short(identifier: str) -> str:
    return identifier[:8]


class _Watch:
    """A WatchAvailability stream, read figure by figure."""

    def __init__(
        self, stub: ReservationStub, request: reservation_pb.WatchAvailabilityRequest
    ) -> None:
        self.call = stub.WatchAvailability(request)
        self._stream = self.call.__aiter__()
        self._unread: list[reservation_res.Availability] = []

    async def snapshot(self, within: float) -> list[reservation_res.Availability]:
        message = await asyncio.wait_for(self._stream.__anext__(), within)
        return list(message.figures)

    async def next_figure(
        self, accept: Callable[[reservation_res.Availability], bool], within: float
    ) -> reservation_res.Availability:
        async def read() -> reservation_res.Availability:
            while True:
                while self._unread:
                    figure = self._unread.pop(0)
                    if accept(figure):
                        return figure
                self._unread = list((await self._stream.__anext__()).figures)

        return await asyncio.wait_for(read(), within)

    def close(self) -> None:
        self.call.cancel()


class Journey:
    """The steps, each printing what the services answer."""

    def __init__(self, clients: _Clients, config: JourneyConfig, say: Say) -> None:
        self.c = clients
        self.config = config
        self.say = say
        self.tag = uuid.uuid4().hex[:8]
        self.result = JourneyResult(tag=self.tag, sku=SKU)
        self.step = "0. getting ready"
        self.names: dict[str, str] = {}
        self.locations: dict[str, ledger_res.Location] = {}
        self.sku_name = SKU
        self.watched_start = 0  # what Maastricht promises when the customer starts watching
        self.colour = "their colour"
        self._sequence = 0

    # -- plumbing --------------------------------------------------------------------

    def fail(self, problem: str) -> JourneyFailed:
        """The error of the current step."""
        return JourneyFailed(self.step, problem)

    def answer(self, service: str, text: str) -> None:
        """Print one line of what a service answered."""
        self.say(f"   {service:<12} {text}")

    def rid(self, what: str) -> str:
        """A fresh request id of this run."""
        return f"journey-{self.tag}-{what}"

    def key(self) -> ledger_res.IdempotencyKey:
        """The next movement key of this run's scanner."""
        self._sequence += 1
        return ledger_res.IdempotencyKey(device_id=f"journey-{self.tag}", sequence=self._sequence)

    def name(self, location_id: str) -> str:
        """A location's name, for people."""
        return self.names.get(location_id, location_id)

    @asynccontextmanager
    async def chapter(self, number: int, title: str) -> AsyncIterator[None]:
        """A step: its heading, and an RPC or NATS failure in it turned into a named failure."""
        self.step = f"{number}. {title}"
        self.say(f"\n{number}. {title}")
        try:
            yield
        except grpc.aio.AioRpcError as error:
            raise self.fail(f"a service answered {error.code().name}: {error.details()}") from error
        except nats.errors.Error as error:
            raise self.fail(f"NATS failed: {error!r}") from error

    async def wait(
        self,
        what: str,
        probe: Callable[[], Awaitable[T]],
        accept: Callable[[T], bool],
        describe: Callable[[T], str] = repr,
    ) -> T:
        """Poll ``probe`` until ``accept`` takes its answer, or fail naming ``what``."""
        deadline = time.monotonic() + self.config.timeout
        last = "no answer"
        while True:
            try:
                answer = await probe()
            except grpc.aio.AioRpcError as error:
                # Still settling (master data not announced yet, an order not kept yet).
                if error.code() not in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise
                last = f"{error.code().name}: {error.details()}"
            else:
                if accept(answer):
                    return answer
                last = describe(answer)
            if time.monotonic() >= deadline:
                raise self.fail(f"gave up waiting {self.config.timeout:g} s for {what} ({last})")
            await asyncio.sleep(0.2)

    # -- reads -----------------------------------------------------------------------

    async def figures(
        self, channel: str, location_ids: list[str] | None = None
    ) -> reservation_res.SkuAvailability:
        """The channel's availability of the jacket, over the network and per location."""
        found = await self.c.reservations.GetAvailability(
            reservation_pb.GetAvailabilityRequest(
                channel=channel,
                skus=[SKU],
                location_ids=location_ids or [],
                include_locations=location_ids is None,
            )
        )
        return found.availability[0]

    async def figure(self, channel: str, location_id: str) -> reservation_res.Availability:
        """The channel's availability of the jacket at one location."""
        return (await self.figures(channel, [location_id])).locations[0]

    async def on_hand(
        self,
        location_id: str,
        state: types_pb2.StockState.ValueType = types_pb2.STOCK_STATE_SELLABLE,
    ) -> int:
        """The ledger's on-hand of the jacket at a location in one stock state."""
        found = await self.c.ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(
                skus=[SKU],
                location_ids=[location_id],
                states=[state],
            )
        )
        return sum(level.on_hand for level in found.levels)

    async def held_for(self, order_id: str, location_id: str) -> int:
        """Units the order's active holds hold at a location."""
        found = await self.c.reservations.ListReservations(
            reservation_pb.ListReservationsRequest(
                channel=CHANNEL,
                reference=order_id,
                statuses=[reservation_res.RESERVATION_STATUS_ACTIVE],
            )
        )
        return sum(
            line.held_quantity
            for hold in found.reservations
            for line in hold.lines
            if line.location_id == location_id
        )

    async def order(self, order_id: str) -> routing_res.Order:
        """Routing's order."""
        found = await self.c.routing.GetOrder(routing_pb.GetOrderRequest(order_id=order_id))
        return found.order

    async def post(self, movement: ledger_res.MovementInput) -> ledger_res.Movement:
        """Post one movement of the jacket at the ledger."""
        movement.key.CopyFrom(self.key())
        movement.sku = SKU
        posted = await self.c.ledger.PostMovements(
            ledger_pb.PostMovementsRequest(movements=[movement])
        )
        return posted.results[0].movement

    async def task(self, location_id: str, order_id: str) -> fulfilment_res.Fulfilment:
        """Wait for the order's task in a location's work queue."""

        async def find() -> fulfilment_res.Fulfilment | None:
            token = ""
            while True:
                page = await self.c.fulfilment.ListFulfilments(
                    fulfilment_pb.ListFulfilmentsRequest(
                        location_id=location_id, page_size=200, page_token=token
                    )
                )
                for task in page.fulfilments:
                    if task.order_id == order_id:
                        return task
                token = page.next_page_token
                if not token:
                    return None

        found = await self.wait(
            f"a fulfilment task for {order_id} in {self.name(location_id)}'s queue",
            find,
            lambda task: task is not None,
            lambda _: "not in the queue yet",
        )
        if found is None:  # the wait only returns a task
            raise self.fail(f"no task for {order_id} at {self.name(location_id)}")
        return found

    # -- the story -------------------------------------------------------------------

    async def run(self) -> JourneyResult:
        """Play every step; the result says what happened."""
        self.say(
            f"Omnichannel journey {self.tag}: ledger {self.config.ledger_target}, "
            f"reservation {self.config.reservation_target}, routing "
            f"{self.config.routing_target}, fulfilment {self.config.fulfilment_target}"
        )
        async with self.chapter(0, "The scene: the demo network, and stock where it is needed"):
            await self.prepare()
        async with self.chapter(1, f"Seen on social media: the {self.sku_name} goes in a cart"):
            cart = await self.cart()
        async with self.chapter(2, "The next day, on a laptop: the cart is still there"):
            watch = await self.next_day(cart)
        try:
            async with self.chapter(3, f"Stock in {self.colour} drops, and the live stream tells"):
                await self.stock_drops(watch)
        finally:
            watch.close()
        store = self.name(PICKUP_STORE)
        async with self.chapter(4, f"Checkout: click-and-collect at {store}, which has none"):
            order = await self.checkout(cart)
            await self.pickup(order)
        async with self.chapter(5, "A second jacket, for the brother in Groningen"):
            gift = await self.second_order()
        async with self.chapter(6, "The brother has one already: he returns it at another store"):
            await self.return_at_store(gift)
        async with self.chapter(7, "Everything adds up"):
            await self.prove()
        self.say(f"\nThe journey {self.tag} went through every service and everything adds up.")
        return self.result

    async def prepare(self) -> None:
        """Step 0: the demo network is there; stock is where the story needs it."""
        try:
            skus = await self.c.ledger.ListSkus(ledger_pb.ListSkusRequest(product_id=PRODUCT))
        except grpc.aio.AioRpcError as error:
            raise self.fail(
                f"cannot ask the ledger at {self.config.ledger_target} "
                f"({error.code().name}); is `make run` running?"
            ) from error
        known = {sku.sku: sku for sku in skus.skus}
        listed = await self.c.ledger.ListLocations(ledger_pb.ListLocationsRequest())
        self.locations = {loc.location_id: loc for loc in listed.locations}
        self.names = {loc.location_id: loc.name for loc in listed.locations}
        missing = [x for x in (PICKUP_STORE, CART_DC, BROTHER_STORE) if x not in self.names]
        if SKU not in known or missing:
            raise self.fail(
                f"the demo network is not loaded ({SKU if SKU not in known else ''} "
                f"{' '.join(missing)} unknown to the ledger); `make run` loads it, "
                "or `omni demo load`"
            )
        self.sku_name, self.colour = known[SKU].name, known[SKU].colour
        self.answer("ledger", f"{SKU} is the {self.sku_name}")
        rules = await self.c.reservations.ListRules(reservation_pb.ListRulesRequest())
        channels = {rule.channel for rule in rules.channels}
        if not {CHANNEL, OTHER_CHANNEL} <= channels:
            raise self.fail(
                f"channels {CHANNEL} and {OTHER_CHANNEL} have no rules at the reservation "
                "service; `omni demo load` sets them"
            )
        self.answer("reservation", f"channels {', '.join(sorted(channels))} sell from the network")
        web = next(rule for rule in rules.channels if rule.channel == CHANNEL)
        if web.low_stock_threshold < 1:
            raise self.fail(f"channel {CHANNEL} flags no low stock (its threshold is 0)")
        self.watched_start = web.low_stock_threshold + TILL_SALE
        await self.count_pickup_store()
        await self.stock_at_least(CART_DC, 2, 40)
        await self.stock_at_least(BROTHER_STORE, 1, 2)
        # Routing learns locations from the ledger's events: ask for a quote
        # until it plans for the pickup store.
        quote = await self.wait(
            f"routing to know {self.name(PICKUP_STORE)}",
            lambda: self.c.routing.QuoteOrder(
                routing_pb.QuoteOrderRequest(
                    channel=CHANNEL,
                    delivery_method=routing_res.DELIVERY_METHOD_CLICK_AND_COLLECT,
                    customer=routing_res.Customer(pickup_location_id=PICKUP_STORE),
                    lines=[routing_pb.OrderLineInput(sku=SKU, quantity=1)],
                )
            ),
            lambda answer: bool(answer.plan.shipments),
            lambda answer: answer.plan.summary,
        )
        self.answer("routing", f"quote for a pickup in Maastricht: {quote.plan.summary}")

    async def count_pickup_store(self) -> None:
        """Maastricht counts its shelf so that it can promise exactly ``watched_start``."""
        figure = await self.wait(
            f"the reservation service to know {SKU} at {self.name(PICKUP_STORE)}",
            lambda: self.figure(CHANNEL, PICKUP_STORE),
            lambda _: True,
        )
        counted = self.watched_start + figure.reserved + figure.safety_stock
        await self.post(
            ledger_res.MovementInput(
                location_id=PICKUP_STORE,
                cycle_count=ledger_res.CycleCount(counted_quantity=counted),
            )
        )
        self.answer(
            "ledger",
            f"{self.name(PICKUP_STORE)} counts {counted} on the shelf this morning (cycle count)",
        )
        await self.wait(
            f"{self.name(PICKUP_STORE)} to promise {self.watched_start}",
            lambda: self.figure(CHANNEL, PICKUP_STORE),
            lambda f: f.available == self.watched_start,
            lambda f: f"{f.available} available",
        )

    async def stock_at_least(self, location_id: str, wanted: int, delivery: int) -> None:
        """A delivery where the web shop could promise fewer than ``wanted``."""
        figure = await self.figure(CHANNEL, location_id)
        if figure.available >= wanted:
            self.answer("reservation", f"{self.name(location_id)} can promise {figure.available}")
            return
        await self.post(
            ledger_res.MovementInput(
                location_id=location_id,
                receipt=ledger_res.Receipt(quantity=delivery, reference=f"DELIVERY-{self.tag}"),
            )
        )
        self.answer("ledger", f"{self.name(location_id)} receives a delivery of {delivery}")
        await self.wait(
            f"the delivery at {self.name(location_id)} to be counted",
            lambda: self.figure(CHANNEL, location_id),
            lambda f: f.available >= wanted,
            lambda f: f"{f.available} available",
        )

    async def cart(self) -> reservation_res.Reservation:
        """Step 1: seen on social media, put in a cart on the phone."""
        held = await self.c.reservations.Reserve(
            reservation_pb.ReserveRequest(
                request_id=self.rid("cart"),
                channel=CHANNEL,
                reference=f"cart-{self.tag}",
                kind=reservation_res.RESERVATION_KIND_CART,
                lines=[reservation_pb.ReserveLine(sku=SKU, location_id=CART_DC, quantity=1)],
                ttl=CART_TTL,
            )
        )
        cart = held.reservation
        self.result.cart_reservation_id = cart.reservation_id
        self.answer(
            "reservation",
            f"cart hold {_short(cart.reservation_id)}: 1 x {SKU} held at "
            f"{self.name(CART_DC)} until {_when(cart.expires_at)}",
        )
        return cart

    async def next_day(self, cart: reservation_res.Reservation) -> _Watch:
        """Step 2: the cart is still there and is extended; the customer starts watching."""
        found = await self.c.reservations.GetReservation(
            reservation_pb.GetReservationRequest(reservation_id=cart.reservation_id)
        )
        if found.reservation.status != reservation_res.RESERVATION_STATUS_ACTIVE:
            status = reservation_res.ReservationStatus.Name(found.reservation.status)
            raise self.fail(f"the cart hold is {status}, not active")
        extended = await self.c.reservations.ExtendReservation(
            reservation_pb.ExtendReservationRequest(
                request_id=self.rid("extend"),
                reservation_id=cart.reservation_id,
                ttl=CART_TTL,
            )
        )
        self.answer(
            "reservation",
            f"cart hold {_short(cart.reservation_id)} still holds 1; extended until "
            f"{_when(extended.reservation.expires_at)}",
        )
        watch = _Watch(
            self.c.reservations,
            reservation_pb.WatchAvailabilityRequest(
                channel=CHANNEL, skus=[SKU], location_ids=[PICKUP_STORE]
            ),
        )
        try:
            snapshot = await watch.snapshot(self.config.timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            watch.close()
            raise self.fail(f"WatchAvailability sent no snapshot ({error!r})") from error
        for figure in sorted(snapshot, key=lambda f: f.location_id):
            where = self.name(figure.location_id) if figure.location_id else "online"
            self.answer("reservation", f"live: {where}: {figure.available} available")
        return watch

    async def stock_drops(self, watch: _Watch) -> None:
        """Step 3: a sale at the till and another shopper's cart; the stream tells."""
        await self.post(
            ledger_res.MovementInput(
                location_id=PICKUP_STORE,
                shipment=ledger_res.Shipment(quantity=TILL_SALE, reference=f"TILL-{self.tag}"),
            )
        )
        self.answer("ledger", f"{self.name(PICKUP_STORE)} sells {TILL_SALE} at the till")
        try:
            low = await watch.next_figure(
                lambda f: f.location_id == PICKUP_STORE and f.low_stock, self.config.timeout
            )
        except TimeoutError as error:
            raise self.fail("the live stream never flagged low stock") from error
        self.result.low_stock_seen = low.available
        self.answer(
            "reservation",
            f"live: {self.name(PICKUP_STORE)}: only {low.available} left! (low stock)",
        )
        if low.available != self.watched_start - TILL_SALE:
            raise self.fail(
                f"expected {self.watched_start - TILL_SALE} left after the sale, the stream says "
                f"{low.available}"
            )
        other = await self.c.reservations.Reserve(
            reservation_pb.ReserveRequest(
                request_id=self.rid("other-cart"),
                channel=OTHER_CHANNEL,
                reference=f"cart-{self.tag}-other",
                kind=reservation_res.RESERVATION_KIND_CART,
                lines=[
                    reservation_pb.ReserveLine(
                        sku=SKU, location_id=PICKUP_STORE, quantity=low.available
                    )
                ],
            )
        )
        self.result.other_cart_reservation_id = other.reservation.reservation_id
        self.answer(
            "reservation",
            f"another shopper ({OTHER_CHANNEL}) puts the last {low.available} from "
            f"{self.name(PICKUP_STORE)} in their cart",
        )
        try:
            await watch.next_figure(
                lambda f: f.location_id == PICKUP_STORE and f.available == 0,
                self.config.timeout,
            )
        except TimeoutError as error:
            raise self.fail("the live stream never showed the store sold out") from error
        self.answer("reservation", f"live: {self.name(PICKUP_STORE)}: sold out")

    async def checkout(self, cart: reservation_res.Reservation) -> routing_res.Order:
        """Step 4: click-and-collect at the sold-out store, planned as a transfer."""
        order_id = f"order-{self.tag}-collect"
        routed = await self.c.routing.RouteOrder(
            routing_pb.RouteOrderRequest(
                request_id=self.rid("route-collect"),
                order_id=order_id,
                channel=CHANNEL,
                delivery_method=routing_res.DELIVERY_METHOD_CLICK_AND_COLLECT,
                customer=routing_res.Customer(pickup_location_id=PICKUP_STORE),
                lines=[routing_pb.OrderLineInput(sku=SKU, quantity=1)],
                options=routing_res.RoutingOptions(allow_split=False),
                cart_reservation_id=cart.reservation_id,
            )
        )
        order = routed.order
        self.result.pickup_order_id = order_id
        self.print_plan(order)
        shipments = list(order.plan.shipments)
        if (
            order.status != routing_res.ORDER_STATUS_ROUTED
            or len(shipments) != 1
            or shipments[0].type != routing_res.FULFILMENT_TYPE_TRANSFER_TO_STORE
            or shipments[0].source_kind != types_pb2.LOCATION_KIND_DISTRIBUTION_CENTRE
        ):
            raise self.fail(
                f"expected one transfer from a distribution centre to "
                f"{self.name(PICKUP_STORE)}; routing planned: {order.plan.summary}"
            )
        self.result.transfer_source_id = shipments[0].source_location_id
        hold = await self.c.reservations.GetReservation(
            reservation_pb.GetReservationRequest(reservation_id=cart.reservation_id)
        )
        converted = hold.reservation.kind == reservation_res.RESERVATION_KIND_ORDER
        self.result.cart_converted = converted
        status = reservation_res.ReservationStatus.Name(hold.reservation.status)
        self.answer(
            "reservation",
            f"the cart hold {_short(cart.reservation_id)} became the order's hold"
            if converted
            else f"the cart hold {_short(cart.reservation_id)} is "
            f"{_name(status, 'RESERVATION_STATUS_')}; the order holds the jacket at "
            "the transfer's source",
        )
        return order

    def print_plan(self, order: routing_res.Order) -> None:
        """The plan routing made and its reasons, for people."""
        plan = order.plan
        status = _name(routing_res.OrderStatus.Name(order.status), "ORDER_STATUS_")
        self.answer("routing", f"order {order.order_id} {status}: {plan.summary}")
        for s in plan.shipments:
            kind = _name(routing_res.FulfilmentType.Name(s.type), "FULFILMENT_TYPE_")
            self.answer(
                "routing",
                f"  {kind} from {self.name(s.source_location_id)}: {s.distance_km:.0f} km, "
                f"EUR {s.cost_cents / 100:.2f}, expected {_when(s.estimated_at)}",
            )
        ranked = sorted(
            plan.candidates,
            key=lambda c: (c.outcome != routing_res.CANDIDATE_OUTCOME_CHOSEN, c.cost_cents),
        )
        for candidate in ranked[:4]:
            self.answer("routing", f"  why: {candidate.explanation}")

    async def pickup(self, order: routing_res.Order) -> None:
        """Step 4, continued: the transfer travels; the store hands it over against the code."""
        source = self.result.transfer_source_id
        task = await self.task(source, order.order_id)
        self.answer(
            "fulfilment",
            f"task {_short(task.fulfilment_id)} in {self.name(source)}'s queue: transfer to "
            f"{self.name(task.pickup_location_id)}",
        )
        in_transit = await self.on_hand(PICKUP_STORE, types_pb2.STOCK_STATE_IN_TRANSIT)
        await self.work(task, ship=True)
        await self.wait(
            f"the ledger to post the transfer to {self.name(PICKUP_STORE)}",
            lambda: self.on_hand(PICKUP_STORE, types_pb2.STOCK_STATE_IN_TRANSIT),
            lambda units: units == in_transit + 1,
            lambda units: f"{units} in transit",
        )
        self.answer("ledger", f"1 x {SKU} in transit to {self.name(PICKUP_STORE)}")
        shelf = await self.on_hand(PICKUP_STORE)
        received = await self.c.fulfilment.ReceiveTransfer(
            fulfilment_pb.ReceiveTransferRequest(
                request_id=self.rid("receive"), fulfilment_id=task.fulfilment_id
            )
        )
        self.say_task(received.fulfilment, f" at {self.name(PICKUP_STORE)}")
        await self.wait(
            f"the ledger to receive the transfer at {self.name(PICKUP_STORE)}",
            lambda: self.on_hand(PICKUP_STORE),
            lambda units: units == shelf + 1,
            lambda units: f"{units} on hand",
        )
        self.answer("ledger", f"{self.name(PICKUP_STORE)} has it: transfer in posted")
        await self.wait(
            f"the reservation service to hold the jacket at {self.name(PICKUP_STORE)} for "
            "the order",
            lambda: self.held_for(order.order_id, PICKUP_STORE),
            lambda units: units == 1,
            lambda units: f"{units} held there for the order",
        )
        figure = await self.figure(CHANNEL, PICKUP_STORE)
        self.answer(
            "reservation",
            f"held at {self.name(PICKUP_STORE)} for the order until collected: "
            f"{figure.available} available ({figure.on_hand} on hand, {figure.reserved} held)",
        )

        js = self.c.nats.jetstream()
        start = (await js.stream_info(FULFILMENT_STREAM)).state.last_seq + 1
        ready = await self.c.fulfilment.MarkReadyForPickup(
            fulfilment_pb.MarkReadyForPickupRequest(
                request_id=self.rid("ready"), fulfilment_id=task.fulfilment_id
            )
        )
        self.say_task(ready.fulfilment, " (the store never sees the code)")
        event = await self.ready_event(start, task.fulfilment_id)
        self.result.pickup_code = event.pickup_code
        self.answer(
            "fulfilment",
            f"FulfilmentReadyForPickup: code {event.pickup_code} goes to the customer's "
            f"{event.channel} account; collect by {_when(event.collect_by)}",
        )
        collected = await self.c.fulfilment.CollectFulfilment(
            fulfilment_pb.CollectFulfilmentRequest(
                request_id=self.rid("collect"),
                fulfilment_id=task.fulfilment_id,
                pickup_code=event.pickup_code,
            )
        )
        self.say_task(collected.fulfilment, " against the code")
        await self.fulfilled(order.order_id)

    async def ready_event(
        self, start_sequence: int, fulfilment_id: str
    ) -> fulfilment_events.FulfilmentReadyForPickup:
        """The FulfilmentReadyForPickup of a task, read from JetStream."""
        js = self.c.nats.jetstream()
        subscription = await js.pull_subscribe(
            READY_SUBJECT,
            stream=FULFILMENT_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_sequence,
                ack_policy=AckPolicy.NONE,
            ),
        )
        deadline = time.monotonic() + self.config.timeout
        try:
            while time.monotonic() < deadline:
                try:
                    messages = await subscription.fetch(50, timeout=1)
                except TimeoutError:
                    continue
                for message in messages:
                    envelope = event_pb2.EventEnvelope.FromString(message.data)
                    ready = unpack(envelope, fulfilment_events.FulfilmentReadyForPickup)
                    if ready is not None and ready.fulfilment_id == fulfilment_id:
                        return ready
        finally:
            await subscription.unsubscribe()
        raise self.fail(
            f"no FulfilmentReadyForPickup for task {fulfilment_id} on {READY_SUBJECT} within "
            f"{self.config.timeout:g} s"
        )

    def say_task(self, task: fulfilment_res.Fulfilment, detail: str = "") -> None:
        """Print where a task stands after a step."""
        status = _name(fulfilment_res.FulfilmentStatus.Name(task.status), "FULFILMENT_STATUS_")
        self.answer("fulfilment", f"task {_short(task.fulfilment_id)}: {status}{detail}")

    async def work(self, task: fulfilment_res.Fulfilment, *, ship: bool) -> None:
        """Staff accept, pick, pack and (``ship``) hand the parcel to the carrier."""
        staff = self.c.fulfilment
        task_id = task.fulfilment_id
        accepted = await staff.AcceptFulfilment(
            fulfilment_pb.AcceptFulfilmentRequest(
                request_id=self.rid(f"accept-{task_id}"), fulfilment_id=task_id
            )
        )
        self.say_task(accepted.fulfilment)
        picked = await staff.ConfirmPick(
            fulfilment_pb.ConfirmPickRequest(
                request_id=self.rid(f"pick-{task_id}"),
                fulfilment_id=task_id,
                lines=[
                    fulfilment_pb.PickedLine(sku=item.sku, picked_quantity=item.quantity)
                    for item in task.items
                ],
            )
        )
        units = sum(item.picked_quantity for item in picked.fulfilment.items)
        wanted = sum(item.quantity for item in task.items)
        self.say_task(picked.fulfilment, f" ({units} of {wanted})")
        packed = await staff.PackFulfilment(
            fulfilment_pb.PackFulfilmentRequest(
                request_id=self.rid(f"pack-{task_id}"), fulfilment_id=task_id
            )
        )
        self.say_task(packed.fulfilment)
        if ship:
            shipped = await staff.ShipFulfilment(
                fulfilment_pb.ShipFulfilmentRequest(
                    request_id=self.rid(f"ship-{task_id}"),
                    fulfilment_id=task_id,
                    carrier="postnl",
                    tracking_number=f"3S{self.tag.upper()}{task_id[:4].upper()}",
                )
            )
            done = shipped.fulfilment
            self.say_task(done, f" with {done.carrier}, tracking {done.tracking_number}")

    async def fulfilled(self, order_id: str) -> routing_res.Order:
        """Wait until routing counts the order fulfilled."""
        order = await self.wait(
            f"order {order_id} to be fulfilled",
            lambda: self.order(order_id),
            lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
            lambda o: routing_res.OrderStatus.Name(o.status),
        )
        self.answer("routing", f"order {order_id} fulfilled")
        return order

    async def second_order(self) -> routing_res.Order:
        """Step 5: a second jacket ships from the store nearest to the brother."""
        address = self.locations[BROTHER_STORE].position
        figures = await self.figures(CHANNEL)
        stocked = [
            f.location_id
            for f in figures.locations
            if f.available > 0
            and (loc := self.locations.get(f.location_id)) is not None
            and loc.kind == types_pb2.LOCATION_KIND_STORE
            and loc.capabilities.ship_from_store
            and not loc.closed
        ]
        if not stocked:
            raise self.fail("no store that ships has the jacket")
        nearest = min(stocked, key=lambda loc: haversine_km(self.locations[loc].position, address))
        self.answer(
            "reservation",
            f"nearest store with it: {self.name(nearest)} "
            f"({haversine_km(self.locations[nearest].position, address):.0f} km)",
        )
        order_id = f"order-{self.tag}-gift"
        routed = await self.c.routing.RouteOrder(
            routing_pb.RouteOrderRequest(
                request_id=self.rid("route-gift"),
                order_id=order_id,
                channel=CHANNEL,
                delivery_method=routing_res.DELIVERY_METHOD_SHIP_TO_HOME,
                customer=routing_res.Customer(position=address, country="NL"),
                lines=[routing_pb.OrderLineInput(sku=SKU, quantity=1)],
                options=routing_res.RoutingOptions(allow_split=False),
            )
        )
        order = routed.order
        self.result.shipped_order_id = order_id
        self.print_plan(order)
        sources = [(s.source_location_id, s.type) for s in order.plan.shipments]
        if sources != [(nearest, routing_res.FULFILMENT_TYPE_SHIP_FROM_STORE)]:
            raise self.fail(
                f"expected a shipment from {self.name(nearest)}, the nearest store that "
                f"has it; routing planned: {order.plan.summary}"
            )
        self.result.ship_source_id = nearest
        task = await self.task(nearest, order_id)
        await self.work(task, ship=True)
        return await self.fulfilled(order_id)

    async def return_at_store(self, order: routing_res.Order) -> None:
        """Step 6: the brother returns it at another store; it goes back on sale there."""
        address = self.locations[BROTHER_STORE].position
        levels = await self.c.ledger.GetStockLevels(
            ledger_pb.GetStockLevelsRequest(
                skus=[SKU], states=[types_pb2.STOCK_STATE_SELLABLE], include_zero=True
            )
        )
        carried = {level.stock.location_id for level in levels.levels}
        stores = [
            loc
            for loc in self.locations.values()
            if loc.kind == types_pb2.LOCATION_KIND_STORE
            and loc.capabilities.accepts_returns
            and not loc.closed
            and loc.location_id in carried
            and loc.location_id != self.result.ship_source_id
        ]
        if not stores:
            raise self.fail("no other store that takes returns carries the jacket")
        store = min(stores, key=lambda loc: haversine_km(loc.position, address)).location_id
        before = await self.on_hand(store)
        return_id = f"return-{self.tag}"
        routed = await self.c.routing.RouteReturn(
            routing_pb.RouteReturnRequest(
                request_id=self.rid("return"),
                return_id=return_id,
                order_id=order.order_id,
                location_id=store,
                lines=[
                    routing_pb.ReturnLineInput(
                        sku=SKU, quantity=1, condition=routing_res.ITEM_CONDITION_SELLABLE
                    )
                ],
            )
        )
        line = routed.order_return.lines[0]
        disposition = _name(
            routing_res.ReturnDisposition.Name(line.disposition), "RETURN_DISPOSITION_"
        )
        self.answer(
            "routing",
            f"return {return_id} at {self.name(store)}: {disposition}: {line.explanation}",
        )
        self.result.return_id = return_id
        self.result.return_location_id = store
        if (
            line.disposition != routing_res.RETURN_DISPOSITION_RESTOCK
            or line.destination_location_id != store
        ):
            raise self.fail(f"expected the jacket restocked at {self.name(store)}")
        await self.wait(
            f"the ledger to restock it at {self.name(store)}",
            lambda: self.on_hand(store),
            lambda units: units == before + 1,
            lambda units: f"{units} on hand",
        )
        self.answer("ledger", f"{self.name(store)}: {before} -> {before + 1} on hand")
        figure = await self.wait(
            f"the reservation service to count it at {self.name(store)}",
            lambda: self.figure(CHANNEL, store),
            lambda f: f.on_hand == before + 1,
            lambda f: f"{f.on_hand} on hand",
        )
        self.answer(
            "reservation",
            f"{self.name(store)} can promise {figure.available} again (on the shelf)",
        )

    async def prove(self) -> None:
        """Step 7: the books balance, every hold ended, every channel agrees."""
        other = self.result.other_cart_reservation_id
        await self.c.reservations.ReleaseReservation(
            reservation_pb.ReleaseReservationRequest(
                request_id=self.rid("abandon"),
                reservation_id=other,
                reason_code="CART_ABANDONED",
            )
        )
        self.answer("reservation", f"the other shopper abandons cart {_short(other)}")
        await self.holds_ended()
        await self.ledger_audit()
        await self.channels_agree()

    async def holds_ended(self) -> None:
        """Every hold the journey placed ended as consumed or released."""

        async def journey_holds() -> dict[str, reservation_res.Reservation]:
            holds: dict[str, reservation_res.Reservation] = {}
            for reservation_id in (
                self.result.cart_reservation_id,
                self.result.other_cart_reservation_id,
            ):
                found = await self.c.reservations.GetReservation(
                    reservation_pb.GetReservationRequest(reservation_id=reservation_id)
                )
                holds[reservation_id] = found.reservation
            for order_id in (self.result.pickup_order_id, self.result.shipped_order_id):
                listed = await self.c.reservations.ListReservations(
                    reservation_pb.ListReservationsRequest(channel=CHANNEL, reference=order_id)
                )
                holds.update({hold.reservation_id: hold for hold in listed.reservations})
            return holds

        def describe(holds: dict[str, reservation_res.Reservation]) -> str:
            return ", ".join(
                f"{_short(h.reservation_id)} ({h.reference}) "
                f"{reservation_res.ReservationStatus.Name(h.status)}"
                for h in holds.values()
            )

        def ended(holds: dict[str, reservation_res.Reservation]) -> bool:
            return all(
                h.status != reservation_res.RESERVATION_STATUS_ACTIVE for h in holds.values()
            )

        holds = await self.wait("every hold of the journey to end", journey_holds, ended, describe)
        for hold in holds.values():
            status = _name(
                reservation_res.ReservationStatus.Name(hold.status), "RESERVATION_STATUS_"
            )
            self.result.hold_statuses[hold.reservation_id] = status
            self.answer(
                "reservation", f"hold {_short(hold.reservation_id)} ({hold.reference}): {status}"
            )
        wrong = {i: h for i, h in holds.items() if h.status not in ENDED_WELL}
        if wrong:
            raise self.fail(f"holds ended neither consumed nor released: {describe(wrong)}")

    async def ledger_audit(self) -> None:
        """The ledger audit over the whole database."""
        try:
            conn = await asyncpg.connect(self.config.database_url)
        except (OSError, asyncpg.PostgresError) as error:
            raise self.fail(
                f"cannot reach the database at {self.config.database_url} to audit the "
                f"ledger ({error!r})"
            ) from error
        try:
            report = await audit(conn)
        finally:
            await conn.close()
        if not report.ok:
            listed = "; ".join(str(finding) for finding in report.findings[:10])
            raise self.fail(f"the ledger does NOT balance: {listed}")
        self.result.balances_checked = report.balances_checked
        self.answer(
            "ledger",
            f"audit: the ledger balances ({report.balances_checked} balances, "
            f"{report.postings_checked} postings checked)",
        )

    async def channels_agree(self) -> None:
        """Every channel's figures for the jacket: on-hand - held - safety stock."""
        rules = await self.c.reservations.ListRules(reservation_pb.ListRulesRequest())
        location_safety = {s.location_id: s.safety_stock for s in rules.location_safety_stock}

        async def disagreements() -> tuple[list[str], dict[str, reservation_res.SkuAvailability]]:
            levels = await self.c.ledger.GetStockLevels(
                ledger_pb.GetStockLevelsRequest(
                    skus=[SKU], states=[types_pb2.STOCK_STATE_SELLABLE], include_zero=True
                )
            )
            on_hand = {level.stock.location_id: level.on_hand for level in levels.levels}
            problems: list[str] = []
            figures: dict[str, reservation_res.SkuAvailability] = {}
            reserved: dict[str, int] = {}
            for channel in rules.channels:
                figures[channel.channel] = found = await self.figures(channel.channel)
                total = 0
                for f in found.locations:
                    loc = self.locations.get(f.location_id)
                    safety = location_safety.get(f.location_id, 0) + channel.safety_stock
                    units = on_hand.get(f.location_id, 0)
                    want = 0 if loc is None or loc.closed else max(0, units - f.reserved - safety)
                    total += want
                    if (f.on_hand, f.safety_stock, f.available) != (units, safety, want):
                        problems.append(
                            f"{channel.channel} at {f.location_id}: on hand {f.on_hand} "
                            f"(ledger {units}), safety {f.safety_stock} (rules {safety}), "
                            f"available {f.available} (expected {want})"
                        )
                    seen = reserved.setdefault(f.location_id, f.reserved)
                    if seen != f.reserved:
                        problems.append(
                            f"{f.location_id}: held {f.reserved} for {channel.channel} but "
                            f"{seen} for another channel"
                        )
                if found.network.available != total:
                    problems.append(
                        f"{channel.channel} online: {found.network.available} available, "
                        f"the locations add up to {total}"
                    )
            return problems, figures

        _, figures = await self.wait(
            "every channel's availability to agree with on-hand - held - safety stock",
            disagreements,
            lambda answer: not answer[0],
            lambda answer: "; ".join(answer[0][:5]),
        )
        story = [
            PICKUP_STORE,
            self.result.transfer_source_id,
            self.result.ship_source_id,
            self.result.return_location_id,
        ]
        for channel, found in figures.items():
            at = {f.location_id: f for f in found.locations}
            parts = [
                f"{self.name(loc)} {at[loc].available} "
                f"(={at[loc].on_hand}-{at[loc].reserved}-{at[loc].safety_stock})"
                for loc in dict.fromkeys(story)
                if loc in at
            ]
            self.answer(
                "reservation",
                f"{channel}: online {found.network.available} available; " + ", ".join(parts),
            )
        self.answer(
            "reservation",
            "every channel: available = on hand - held - safety stock, at every location",
        )
