"""Every RPC of the four services under a fuzzer, through real gRPC.

``hypothesis`` builds requests for every method of the ledger, the reservation
service, routing and fulfilment from the messages' descriptors: strings that
are empty, well-formed ids (some of which exist), arbitrary Unicode, control
characters and huge ones; integers at and past every boundary; NaN and
infinite coordinates; enum values the contract does not know; timestamps and
durations out of range; empty, duplicated and oversized lists. Three kinds of
request go out as bytes to the real services running in-process: anything at
all, a valid request (against a small world of stores, stock, holds, orders
and tasks in the state each step needs) with a field or two changed, and bytes
that are no request at all. The answer must be:

- OK, or a well-formed error (a status from ``ALLOWED``, a message a person
  can read, and an ``ErrorInfo`` with an UPPER_SNAKE reason) - never UNKNOWN,
  INTERNAL, a hang, or an error too big for the client to read;
- nothing half-written: a refused ``PostMovements`` recorded none of its
  movements (an accepted one all of them), a refused ``Reserve`` placed no
  hold, a refused ``RouteOrder`` or ``RouteReturn`` kept no order or return;

and afterwards every service still serves and the ledger audit passes.

Then what the fuzzer found, as plain tests: forged page tokens, each input limit
(named field, the limit in the message, a short message), the message size
limit, and the watch streams one client may hold. ``FUZZ_SCALE=10`` fuzzes ten
times longer; by default the file runs in about half a minute.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from omni.common.v1 import types_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import fulfilment_service_pb2_grpc as fulfilment_grpc
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omni.routing.v1 import routing_service_pb2_grpc as routing_grpc
from omnistock.db import Pool
from omnistock.grpc.client import ChannelFactory
from omnistock.grpc.errors import bad_request, error_info
from omnistock.grpc.health import health_check
from omnistock.service import RunningService, start_service
from omnistock.settings import Settings
from omnistock.validation import ID_PATTERN
from services.fulfilment.app import SPEC as FULFILMENT
from services.ledger.audit import audit
from services.reservation.watch import MAX_WATCHES_PER_CLIENT
from tests.conftest import LedgerStub, Network, ReservationStub
from tests.integration.conftest import RoutingStub, eventually
from tests.integration.routing.conftest import AMSTERDAM, NIEUWEGEIN, UTRECHT, World

pytestmark = pytest.mark.integration

FulfilmentStub: TypeAlias = "fulfilment_grpc.FulfilmentServiceAsyncStub"

# What a service may answer a request it refuses. UNAUTHENTICATED and
# PERMISSION_DENIED come once calls carry credentials; RESOURCE_EXHAUSTED is
# a request over a limit (the message size); ABORTED a conflict a retry cures.
ALLOWED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
REASON = re.compile(r"[A-Z][A-Z0-9_]+")
# The largest request a service takes (OMNI_GRPC_MAX_MESSAGE_BYTES).
MAX_MESSAGE_BYTES: int = Settings.model_fields["grpc_max_message_bytes"].default
CALL_TIMEOUT = 10.0
# Examples per RPC and test; FUZZ_SCALE=10 fuzzes ten times as long (not in CI).
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = 40 * SCALE
RAW_EXAMPLES = 15 * SCALE
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# -- the RPCs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One method of a service, called with raw bytes."""

    service: str  # "ledger", "reservation", "routing" or "fulfilment"
    path: str  # /package.Service/Method
    name: str
    request: descriptor.Descriptor
    streaming: bool

    def __str__(self) -> str:
        return f"{self.service}.{self.name}"


def _rpcs() -> list[Rpc]:
    services = (
        ("ledger", ledger_pb.DESCRIPTOR.services_by_name["StockLedgerService"]),
        ("reservation", reservation_pb.DESCRIPTOR.services_by_name["ReservationService"]),
        ("routing", routing_pb.DESCRIPTOR.services_by_name["OrderRoutingService"]),
        ("fulfilment", fulfilment_pb.DESCRIPTOR.services_by_name["FulfilmentService"]),
    )
    return [
        Rpc(
            name,
            f"/{service.full_name}/{method.name}",
            method.name,
            method.input_type,
            method.server_streaming,
        )
        for name, service in services
        for method in service.methods
    ]


RPCS = _rpcs()


# -- what exists, so some requests get past validation ---------------------------------------


@dataclass
class Known:
    """What exists in the fuzzed services: ids the fuzzer mixes into its requests,
    and the parts of valid requests."""

    channels: dict[str, grpc.aio.Channel]
    pool: Pool
    channel: str
    skus: list[str]
    places: dict[str, str]  # name -> location id
    product_id: str
    device: str
    cart_id: str
    cart_reference: str
    open_order: str  # routed; CancelOrder's
    shipped_order: str  # fulfilled; RouteReturn's
    # Tasks in the state each step needs: waiting to be accepted, accepted (to
    # be picked; ConfirmPick takes one of several), packed, a pickup picked and
    # one ready at the counter.
    created_task: str
    accepted_tasks: list[str]
    packed_task: str
    picked_pickup: str
    ready_pickup: str
    ids: list[str] = field(default_factory=list)
    # The routing rules before the fuzzing (they are shared by every test).
    rules: routing_res.RoutingRules = field(default_factory=routing_res.RoutingRules)


async def restore_rules(k: Known) -> None:
    """Put the routing rules back as they were before the fuzzer changed them."""
    routing: RoutingStub = routing_grpc.OrderRoutingServiceStub(k.channels["routing"])
    now = (await routing.GetRoutingRules(routing_pb.GetRoutingRulesRequest())).rules
    if now.version == k.rules.version:
        return
    rules = routing_res.RoutingRules()
    rules.CopyFrom(k.rules)
    rules.ClearField("version")
    rules.ClearField("updated_at")
    await routing.SetRoutingRules(
        routing_pb.SetRoutingRulesRequest(
            request_id=f"fuzz-restore-{uuid.uuid4().hex}", rules=rules
        )
    )


@pytest.fixture(scope="module")
async def fuzz_fulfilment(
    settings: Settings, routing_service: RunningService
) -> AsyncIterator[RunningService]:
    """The fulfilment service beside the session's ledger, reservation and routing."""
    service = await start_service(FULFILMENT, settings, grpc_port=0, serve_metrics_endpoint=False)
    yield service
    await service.stop()


async def _task_of(fulfilment: FulfilmentStub, location_id: str, order_id: str) -> str:
    found = await eventually(
        lambda: fulfilment.ListFulfilments(
            fulfilment_pb.ListFulfilmentsRequest(location_id=location_id, page_size=200)
        ),
        lambda page: any(t.order_id == order_id for t in page.fulfilments),
    )
    return next(t.fulfilment_id for t in found.fulfilments if t.order_id == order_id)


STEPS: list[tuple[str, Callable[[str, str], Message]]] = [
    ("AcceptFulfilment", lambda task, _: fulfilment_pb.AcceptFulfilmentRequest(
        request_id=f"fuzz-accept-{task}", fulfilment_id=task)),
    ("ConfirmPick", lambda task, sku: fulfilment_pb.ConfirmPickRequest(
        request_id=f"fuzz-pick-{task}", fulfilment_id=task,
        lines=[fulfilment_pb.PickedLine(sku=sku, picked_quantity=1)])),
    ("PackFulfilment", lambda task, _: fulfilment_pb.PackFulfilmentRequest(
        request_id=f"fuzz-pack-{task}", fulfilment_id=task)),
    ("ShipFulfilment", lambda task, _: fulfilment_pb.ShipFulfilmentRequest(
        request_id=f"fuzz-ship-{task}", fulfilment_id=task, carrier="postnl",
        tracking_number="3S123")),
]  # fmt: skip


async def _work(fulfilment: FulfilmentStub, task_id: str, sku: str, steps: int) -> None:
    """Take a task through its first ``steps`` steps (accept, pick, pack, ship)."""
    for step, request in STEPS[:steps]:
        await getattr(fulfilment, step)(request(task_id, sku))


@pytest.fixture(scope="module")
async def known(
    ledger_service: RunningService,
    reservation_service: RunningService,
    routing_service: RunningService,
    fuzz_fulfilment: RunningService,
    ledger: LedgerStub,
    reservations: ReservationStub,
    routing: RoutingStub,
    pool: Pool,
    channels: ChannelFactory,
) -> AsyncIterator[Known]:
    """A small world: two stores and a DC, two SKUs in stock, a channel, a cart hold,
    an order waiting at a store and a shipped one. The routing rules, which every
    test shares, are put back afterwards."""
    rules = (await routing.GetRoutingRules(routing_pb.GetRoutingRulesRequest())).rules
    world = World(Network(ledger), reservations, routing, pool)
    await world.build(
        {"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM), "dc": ("dc", UTRECHT)},
        skus=2,
    )
    await world.known_to_routing()
    for sku in world.skus:
        await world.stock(sku, "utrecht", 100)
    cart = await reservations.Reserve(
        reservation_pb.ReserveRequest(
            request_id=f"fuzz-cart-{world.tag}",
            channel=world.channel,
            reference=f"cart-{world.tag}",
            kind=reservation_res.RESERVATION_KIND_CART,
            lines=[
                reservation_pb.ReserveLine(sku=world.skus[0], location_id=world.id("utrecht"),
                                           quantity=1)
            ],
        )
    )  # fmt: skip
    # The service token: the fuzzer is about what each RPC does with its input.
    rpc_channels = {
        name: channels.open(f"127.0.0.1:{service.grpc_port}")
        for name, service in (
            ("ledger", ledger_service),
            ("reservation", reservation_service),
            ("routing", routing_service),
            ("fulfilment", fuzz_fulfilment),
        )
    }
    fulfilment: FulfilmentStub = fulfilment_grpc.FulfilmentServiceStub(rpc_channels["fulfilment"])
    sku = world.skus[1]

    async def task(steps: int, pickup: bool = False) -> tuple[str, str]:
        order = (
            await world.route([(sku, 1)], pickup="utrecht")
            if pickup
            else await world.route([(sku, 1)], to=NIEUWEGEIN)
        )
        task_id = await _task_of(fulfilment, order.allocations[0].location_id, order.order_id)
        await _work(fulfilment, task_id, sku, steps)
        return order.order_id, task_id

    opened, _ = await task(0)
    _, created_task = await task(0)
    accepted = [(await task(1))[1] for _ in range(3)]
    _, packed_task = await task(3)
    _, picked_pickup = await task(2, pickup=True)
    _, ready_pickup = await task(2, pickup=True)
    await fulfilment.MarkReadyForPickup(
        fulfilment_pb.MarkReadyForPickupRequest(
            request_id=f"fuzz-ready-{ready_pickup}", fulfilment_id=ready_pickup
        )
    )
    shipped, shipped_task = await task(4)
    await eventually(
        lambda: world.get(shipped),
        lambda order: order.status == routing_res.ORDER_STATUS_FULFILLED,
    )
    places = {name: world.id(name) for name in ("utrecht", "amsterdam", "dc")}
    found = Known(
        channels=rpc_channels,
        pool=pool,
        channel=world.channel,
        skus=world.skus,
        places=places,
        product_id=f"P-{world.tag}",
        device=world.network.device,
        cart_id=cart.reservation.reservation_id,
        cart_reference=cart.reservation.reference,
        open_order=opened,
        shipped_order=shipped,
        created_task=created_task,
        accepted_tasks=accepted,
        packed_task=packed_task,
        picked_pickup=picked_pickup,
        ready_pickup=ready_pickup,
        rules=rules,
    )
    found.ids = [
        found.channel,
        *found.skus,
        *found.places.values(),
        found.product_id,
        found.device,
        found.cart_id,
        found.cart_reference,
        found.open_order,
        found.shipped_order,
        found.created_task,
        *found.accepted_tasks,
        found.packed_task,
        found.picked_pickup,
        found.ready_pickup,
        shipped_task,
    ]
    yield found
    await restore_rules(found)
    for channel in rpc_channels.values():
        await channel.close()


# -- strategies from the descriptors ---------------------------------------------------------

EDGE_STRINGS = [
    " ",
    "\n",
    "a\nb",
    "a\x00b",
    "\x7f",
    "DAMAGED",
    "CUSTOMER_CHANGED_MIND",
    "p1",
    "p" + "f" * 16,
    "p" + "f" * 17,
    "Europe/Amsterdam",
    "../../etc/passwd",
    "NL",
    "3511 AB",
    "postnl",
    "123456",
    "00000000-0000-0000-0000-000000000000",
    "{12345678-1234-5678-1234-567812345678}",
    "ø" * 64,
    "x" * 64,
    "x" * 65,
    "🛒" * 20,
    "\u202eevil",
    "'; DROP TABLE ledger.movements; --",
]
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
}
_BOUNDARIES = [0, 1, -1, 2, 50, 100, 101, 200, 201, 500, 501, 1000, 1001, 10_000, 10_001,
               1_000_000, 1_000_001, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]  # fmt: skip


_WELL_KNOWN = (Timestamp.DESCRIPTOR, Duration.DESCRIPTOR)


def strings(known: Sequence[str], *, huge: bool) -> st.SearchStrategy[str]:
    """Strings a client might send, and many it should not."""
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(known),
        st.just(""),
        st.from_regex(ID_PATTERN, fullmatch=True),
        st.text(st.characters(codec="utf-8"), max_size=30),
        st.sampled_from(EDGE_STRINGS),
        st.uuids().map(str),
    ]
    if huge:
        options.append(
            st.builds(
                lambda char, n: char * n,
                st.sampled_from(["x", "é", "💥", "\x01"]),
                st.integers(1_000, 60_000),
            )
        )
    return st.one_of(options)


def integers(kind: int) -> st.SearchStrategy[int]:
    """Small numbers, every boundary a limit could sit at, and the whole range."""
    low, high = _INT_RANGES[kind]
    return st.one_of(
        st.sampled_from([b for b in _BOUNDARIES if low <= b <= high]),
        st.integers(-3, 300),
        st.integers(low, high),
    )


# Fixed once: a strategy must draw alike each time hypothesis replays an example.
NOW = int(datetime.now(UTC).timestamp())


def timestamps() -> st.SearchStrategy[Timestamp]:
    now = NOW
    return st.builds(
        Timestamp,
        seconds=st.one_of(
            st.integers(now - 86_400, now + 86_400),
            st.sampled_from([0, -62135596800, -62135596801, 253402300799, 253402300800]),
            integers(FieldDescriptor.TYPE_INT64),
        ),
        nanos=st.one_of(st.just(0), integers(FieldDescriptor.TYPE_INT32)),
    )


def durations() -> st.SearchStrategy[Duration]:
    return st.builds(
        Duration,
        seconds=st.one_of(
            st.sampled_from([0, 59, 60, 1200, 604_800, 604_801, -1]),
            integers(FieldDescriptor.TYPE_INT64),
        ),
        nanos=st.one_of(st.just(0), integers(FieldDescriptor.TYPE_INT32)),
    )


def values(fd: FieldDescriptor, known: Sequence[str], *, huge: bool) -> st.SearchStrategy[Any]:
    """One value of a (non-repeated) field."""
    if fd.type == FieldDescriptor.TYPE_STRING:
        return strings(known, huge=huge)
    if fd.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        return integers(fd.type)
    if fd.type == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([52.09, 5.12, 0.0, 90.0, -180.0]))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        return st.one_of(
            st.sampled_from([v.number for v in fd.enum_type.values]),
            st.integers(-2, 30),
            integers(FieldDescriptor.TYPE_ENUM),
        )
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        assert fd.message_type is not None
        return messages(fd.message_type, known, huge=huge)
    raise AssertionError(f"no strategy for {fd.full_name} (type {fd.type})")


def repeated(
    fd: FieldDescriptor, known: Sequence[str], *, huge: bool
) -> st.SearchStrategy[list[Any]]:
    """Empty, small, with duplicates, or one element repeated past every batch limit."""
    one = values(fd, known, huge=huge)
    return st.one_of(
        st.lists(one, max_size=4),
        st.lists(one, min_size=1, max_size=3).map(lambda items: items + items),
        st.tuples(values(fd, known, huge=False), st.integers(0, 1_200)).map(
            lambda pair: [pair[0]] * pair[1]
        ),
    )


def messages(
    message: descriptor.Descriptor, known: Sequence[str], *, huge: bool = True
) -> st.SearchStrategy[Message]:
    """A message with any subset of its fields set to anything."""
    if message.full_name == Timestamp.DESCRIPTOR.full_name:
        return timestamps()
    if message.full_name == Duration.DESCRIPTOR.full_name:
        return durations()
    cls = message_factory.GetMessageClass(message)
    fields = {
        fd.name: st.none()
        | (repeated(fd, known, huge=huge) if fd.is_repeated else values(fd, known, huge=huge))
        for fd in message.fields
    }

    def build(chosen: dict[str, Any]) -> Message:
        built = cls()
        for name, value in chosen.items():
            if value is None:
                continue
            fd = message.fields_by_name[name]
            if fd.is_repeated:
                getattr(built, name).extend(value)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(built, name).CopyFrom(value)
            else:
                setattr(built, name, value)
        return built

    return st.fixed_dictionaries(fields).map(build)


# -- valid requests, changed in a field or two -------------------------------------------


def _valid(rpc: str, k: Known, uid: str) -> Message:
    """A request of ``rpc`` that the service would carry out (``uid``: fresh ids)."""
    sku, other = k.skus
    utrecht = k.places["utrecht"]
    home = routing_res.Customer(
        position=types_pb2.GeoPoint(latitude=NIEUWEGEIN[0], longitude=NIEUWEGEIN[1]),
        postcode="3431 AB",
        country="NL",
    )
    templates: dict[str, Callable[[], Message]] = {
        "PostMovements": lambda: ledger_pb.PostMovementsRequest(
            movements=[
                ledger_res.MovementInput(
                    key=ledger_res.IdempotencyKey(device_id=f"fuzz-{uid}", sequence=1),
                    sku=sku,
                    location_id=utrecht,
                    receipt=ledger_res.Receipt(quantity=1, reference="delivery-1"),
                )
            ]
        ),
        "GetStockLevels": lambda: ledger_pb.GetStockLevelsRequest(
            skus=[sku], location_ids=[utrecht], include_zero=True
        ),
        "ListMovements": lambda: ledger_pb.ListMovementsRequest(
            sku=sku, location_id=utrecht, page_size=5
        ),
        "UpsertLocations": lambda: ledger_pb.UpsertLocationsRequest(
            request_id=uid,
            locations=[
                ledger_res.Location(
                    location_id=utrecht,
                    kind=types_pb2.LOCATION_KIND_STORE,
                    name="Utrecht (store)",
                    position=types_pb2.GeoPoint(latitude=UTRECHT[0], longitude=UTRECHT[1]),
                    capabilities=ledger_res.LocationCapabilities(
                        ship_from_store=True, click_and_collect=True, accepts_returns=True
                    ),
                )
            ],
        ),
        "ListLocations": lambda: ledger_pb.ListLocationsRequest(kind=types_pb2.LOCATION_KIND_STORE),
        "UpsertSkus": lambda: ledger_pb.UpsertSkusRequest(
            request_id=uid,
            skus=[ledger_res.Sku(sku=sku, product_id=k.product_id, name=f"Test {sku}")],
        ),
        "ListSkus": lambda: ledger_pb.ListSkusRequest(product_id=k.product_id, page_size=1),
        "Reserve": lambda: reservation_pb.ReserveRequest(
            request_id=uid,
            channel=k.channel,
            reference=f"cart-{uid}",
            kind=reservation_res.RESERVATION_KIND_CART,
            lines=[reservation_pb.ReserveLine(sku=sku, location_id=utrecht, quantity=1)],
            ttl=Duration(seconds=600),
        ),
        "ExtendReservation": lambda: reservation_pb.ExtendReservationRequest(
            request_id=uid, reservation_id=k.cart_id, ttl=Duration(seconds=600)
        ),
        "ReleaseReservation": lambda: reservation_pb.ReleaseReservationRequest(
            request_id=uid, reservation_id=k.cart_id, reason_code="CART_ABANDONED"
        ),
        "ConvertReservation": lambda: reservation_pb.ConvertReservationRequest(
            request_id=uid, reservation_id=k.cart_id, reference=f"order-{uid}"
        ),
        "GetReservation": lambda: reservation_pb.GetReservationRequest(reservation_id=k.cart_id),
        "ListReservations": lambda: reservation_pb.ListReservationsRequest(
            channel=k.channel, reference=k.cart_reference
        ),
        "GetAvailability": lambda: reservation_pb.GetAvailabilityRequest(
            channel=k.channel, skus=[sku, other], include_locations=True
        ),
        "WatchAvailability": lambda: reservation_pb.WatchAvailabilityRequest(
            channel=k.channel, skus=[sku], location_ids=[utrecht]
        ),
        "SetChannelRules": lambda: reservation_pb.SetChannelRulesRequest(
            request_id=uid,
            rules=reservation_res.ChannelRules(
                channel=k.channel,
                location_ids=list(k.places.values()),
                cart_ttl=Duration(seconds=1200),
            ),
        ),
        "SetLocationSafetyStock": lambda: reservation_pb.SetLocationSafetyStockRequest(
            request_id=uid,
            safety_stock=reservation_res.LocationSafetyStock(location_id=utrecht, safety_stock=0),
        ),
        "ListRules": reservation_pb.ListRulesRequest,
        "RouteOrder": lambda: routing_pb.RouteOrderRequest(
            request_id=uid,
            order_id=f"order-{uid}",
            channel=k.channel,
            delivery_method=routing_res.DELIVERY_METHOD_SHIP_TO_HOME,
            customer=home,
            lines=[routing_pb.OrderLineInput(sku=other, quantity=1)],
            options=routing_res.RoutingOptions(allow_split=True),
        ),
        "QuoteOrder": lambda: routing_pb.QuoteOrderRequest(
            channel=k.channel,
            delivery_method=routing_res.DELIVERY_METHOD_SHIP_TO_HOME,
            customer=home,
            lines=[routing_pb.OrderLineInput(sku=other, quantity=1)],
        ),
        "GetOrder": lambda: routing_pb.GetOrderRequest(order_id=k.shipped_order),
        "CancelOrder": lambda: routing_pb.CancelOrderRequest(
            request_id=uid, order_id=k.open_order, reason_code="CUSTOMER_REQUEST"
        ),
        "RouteReturn": lambda: routing_pb.RouteReturnRequest(
            request_id=uid,
            return_id=f"return-{uid}",
            order_id=k.shipped_order,
            location_id=utrecht,
            lines=[
                routing_pb.ReturnLineInput(
                    sku=other, quantity=1, condition=routing_res.ITEM_CONDITION_SELLABLE
                )
            ],
        ),
        "GetRoutingRules": routing_pb.GetRoutingRulesRequest,
        "SetRoutingRules": lambda: routing_pb.SetRoutingRulesRequest(
            request_id=uid, rules=routing_res.RoutingRules(time_zone="Europe/Amsterdam")
        ),
        "ListFulfilments": lambda: fulfilment_pb.ListFulfilmentsRequest(
            location_id=utrecht, page_size=1
        ),
        "GetFulfilment": lambda: fulfilment_pb.GetFulfilmentRequest(fulfilment_id=k.packed_task),
        "ConfirmPick": lambda: fulfilment_pb.ConfirmPickRequest(
            request_id=uid,
            fulfilment_id=k.accepted_tasks[int(uid[-2:], 16) % len(k.accepted_tasks)],
            lines=[fulfilment_pb.PickedLine(sku=other, picked_quantity=1)],
        ),
        "ShipFulfilment": lambda: fulfilment_pb.ShipFulfilmentRequest(
            request_id=uid, fulfilment_id=k.packed_task, carrier="postnl", tracking_number="3S1"
        ),
        "CollectFulfilment": lambda: fulfilment_pb.CollectFulfilmentRequest(
            request_id=uid, fulfilment_id=k.ready_pickup, pickup_code="123456"
        ),
        "RejectFulfilment": lambda: fulfilment_pb.RejectFulfilmentRequest(
            request_id=uid, fulfilment_id=k.created_task, reason_code="NO_STAFF"
        ),
        "CancelFulfilment": lambda: fulfilment_pb.CancelFulfilmentRequest(
            request_id=uid, fulfilment_id=k.created_task, reason_code="NO_STAFF"
        ),
    }
    made = templates.get(rpc)
    if made is not None:
        return made()
    # The remaining steps take a request id and a task only.
    cls = message_factory.GetMessageClass(
        fulfilment_pb.DESCRIPTOR.services_by_name["FulfilmentService"]
        .methods_by_name[rpc]
        .input_type
    )
    task = {
        "AcceptFulfilment": k.created_task,
        "PackFulfilment": k.accepted_tasks[0],
        "MarkReadyForPickup": k.picked_pickup,
    }.get(rpc, k.packed_task)
    return cls(request_id=uid, fulfilment_id=task)


FieldPath = tuple[str | int, ...]


def field_paths(message: Message, prefix: FieldPath = ()) -> list[FieldPath]:
    """Every field of ``message`` (set or not), and of the messages and first list
    elements it holds."""
    paths: list[FieldPath] = []
    for fd in message.DESCRIPTOR.fields:
        here = (*prefix, fd.name)
        paths.append(here)
        if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.message_type in _WELL_KNOWN:
            continue
        if fd.is_repeated:
            items = getattr(message, fd.name)
            if len(items):
                paths += field_paths(items[0], (*here, 0))
        elif message.HasField(fd.name):
            paths += field_paths(getattr(message, fd.name), here)
    return paths


def replace_at(message: Message, path: FieldPath, value: Any) -> None:
    """Set the field at ``path`` to ``value`` (a list for a repeated field)."""
    holder: Any = message
    for step in path[:-1]:
        holder = holder[step] if isinstance(step, int) else getattr(holder, step)
    name = path[-1]
    assert isinstance(name, str)
    fd = holder.DESCRIPTOR.fields_by_name[name]
    if fd.is_repeated:
        holder.ClearField(name)
        getattr(holder, name).extend(value)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(holder, name).CopyFrom(value)
    else:
        setattr(holder, name, value)


def field_at(message: Message, path: FieldPath) -> FieldDescriptor:
    """The descriptor of the field at ``path``."""
    holder: Any = message
    for step in path[:-1]:
        holder = holder[step] if isinstance(step, int) else getattr(holder, step)
    fd: FieldDescriptor = holder.DESCRIPTOR.fields_by_name[path[-1]]
    return fd


def near_valid(data: st.DataObject, rpc: Rpc, k: Known) -> Message:
    """A valid request with up to two of its fields set to anything."""
    request = _valid(rpc.name, k, f"fuzz-{data.draw(st.uuids(), label='uid').hex[:16]}")
    for _ in range(data.draw(st.integers(0, 2), label="fields changed")):
        paths = field_paths(request)  # again: a change may have emptied a list
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="field")
        fd = field_at(request, path)
        strategy = (
            repeated(fd, k.ids, huge=True) if fd.is_repeated else values(fd, k.ids, huge=True)
        )
        replace_at(request, path, data.draw(strategy, label=".".join(map(str, path))))
    return request


# -- calling and judging ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a call came back with."""

    code: grpc.StatusCode
    details: str
    reason: str | None


async def call(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes) -> Answer:
    """Send ``payload`` as the request of ``rpc``; a stream is read to its first answer."""
    try:
        if rpc.streaming:
            # No serializers: the payload goes out as it is, the answers come back as bytes.
            streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                rpc.path
            )
            stream = streaming(payload, timeout=CALL_TIMEOUT)
            try:
                await stream.read()  # the snapshot came: a live stream is fine
            finally:
                stream.cancel()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(rpc.path)
            await unary(payload, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return Answer(error.code(), error.details() or "", info.reason if info else None)
    return Answer(grpc.StatusCode.OK, "", None)


def judge(rpc: Rpc, answer: Answer, shown: str, size: int) -> None:
    """OK, or an allowed status with a message and an ErrorInfo reason."""
    if answer.code == grpc.StatusCode.OK:
        return
    assert answer.code in ALLOWED, (
        f"{rpc} answered {answer.code.name} ({answer.details!r}) to {shown}"
    )
    assert answer.details.strip(), f"{rpc} answered {answer.code.name} without a message"
    if answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED and answer.reason is None:
        # gRPC's own message-size limit, before any handler: only for requests
        # over it. (A client also sees RESOURCE_EXHAUSTED when an error's
        # message is too big for its metadata: an error echoing huge input.)
        assert size > MAX_MESSAGE_BYTES, (
            f"{rpc} answered RESOURCE_EXHAUSTED ({answer.details!r}) to a request of "
            f"{size} bytes, under the {MAX_MESSAGE_BYTES}-byte limit: {shown}"
        )
        return
    assert answer.reason is not None and REASON.fullmatch(answer.reason), (
        f"{rpc} answered {answer.code.name} ({answer.details!r}) without an ErrorInfo reason"
    )


def describe(request: Message) -> str:
    """A request, shortened for a failure message."""
    text = str(request)
    return text if len(text) < 2_000 else text[:2_000] + f"... ({len(text)} characters)"


# -- nothing half-written -------------------------------------------------------------------

Probe = Callable[[Pool, Message], Any]


def _storable(text: str) -> bool:
    # PostgreSQL text cannot hold NUL: no row has such an id, and a query naming
    # one fails, so the probes leave those out.
    return "\x00" not in text


async def _movement_keys(pool: Pool, request: Message) -> int:
    assert isinstance(request, ledger_pb.PostMovementsRequest)
    keys = {
        (m.key.device_id, m.key.sequence) for m in request.movements if _storable(m.key.device_id)
    }
    count: int = await pool.fetchval(
        "SELECT count(*) FROM ledger.movements m "
        "JOIN unnest($1::text[], $2::bigint[]) AS k(device_id, sequence) "
        "ON m.device_id = k.device_id AND m.device_sequence = k.sequence",
        [d for d, _ in keys],
        [s for _, s in keys],
    )
    return count


async def _holds_of_reference(pool: Pool, request: Message) -> int:
    assert isinstance(request, reservation_pb.ReserveRequest)
    if not (_storable(request.channel) and _storable(request.reference)):
        return 0
    count: int = await pool.fetchval(
        "SELECT count(*) FROM reservation.reservations WHERE channel = $1 AND reference = $2",
        request.channel,
        request.reference,
    )
    return count


async def _orders_of_id(pool: Pool, request: Message) -> int:
    assert isinstance(request, routing_pb.RouteOrderRequest)
    if not (_storable(request.order_id)):
        return 0
    count: int = await pool.fetchval(
        "SELECT count(*) FROM routing.orders WHERE order_id = $1", request.order_id
    )
    return count


async def _returns_of_id(pool: Pool, request: Message) -> int:
    assert isinstance(request, routing_pb.RouteReturnRequest)
    if not (_storable(request.return_id)):
        return 0
    count: int = await pool.fetchval(
        "SELECT count(*) FROM routing.returns WHERE return_id = $1", request.return_id
    )
    return count


# What a request may have written: unchanged when it was refused.
WRITES: dict[str, Probe] = {
    "PostMovements": _movement_keys,
    "Reserve": _holds_of_reference,
    "RouteOrder": _orders_of_id,
    "RouteReturn": _returns_of_id,
}
REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def _fits(request: Message) -> bool:
    # Bigger than the server takes: gRPC refuses it before any handler runs,
    # and the probes' own queries need not carry it.
    return request.ByteSize() < MAX_MESSAGE_BYTES


# -- the tests ------------------------------------------------------------------------------


async def send_and_judge(rpc: Rpc, known: Known, request: Message) -> None:
    """Send a request, judge the answer, and check a refused one wrote nothing."""
    probe = WRITES.get(rpc.name)
    before = await probe(known.pool, request) if probe and _fits(request) else None
    answer = await call(known.channels[rpc.service], rpc, request.SerializeToString())
    event(answer.code.name if answer.reason is None else f"{answer.code.name} {answer.reason}")
    judge(rpc, answer, describe(request), request.ByteSize())
    if probe is None or before is None:
        return
    after = await probe(known.pool, request)
    if answer.code in REFUSED:
        assert after == before, (
            f"{rpc} was refused ({answer.code.name}: {answer.details}) but wrote "
            f"{after - before} row(s): {describe(request)}"
        )
    elif answer.code == grpc.StatusCode.OK and rpc.name == "PostMovements":
        assert isinstance(request, ledger_pb.PostMovementsRequest)
        keys = {(m.key.device_id, m.key.sequence) for m in request.movements}
        assert after == len(keys), f"a batch was recorded in part: {describe(request)}"


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ
@given(data=st.data())
async def test_every_rpc_answers_arbitrary_requests_with_ok_or_a_clear_error(
    rpc: Rpc, known: Known, data: st.DataObject
) -> None:
    await send_and_judge(rpc, known, data.draw(messages(rpc.request, known.ids), label="request"))


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ
@given(data=st.data())
async def test_every_rpc_answers_valid_requests_with_a_field_or_two_changed(
    rpc: Rpc, known: Known, data: st.DataObject
) -> None:
    await send_and_judge(rpc, known, near_valid(data, rpc, known))


def mutations(rpc: Rpc, known: Sequence[str]) -> st.SearchStrategy[bytes]:
    """Bytes that are no valid request: random, or a valid request with bytes changed."""

    def mutate(pair: tuple[bytes, list[tuple[int, int]]]) -> bytes:
        raw, changes = pair
        if not raw:
            return raw
        out = bytearray(raw)
        for position, value in changes:
            out[position % len(out)] = value
        return bytes(out)

    valid = messages(rpc.request, known, huge=False).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(valid, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                  min_size=1, max_size=4)).map(mutate),
        valid.map(lambda raw: raw[: max(0, len(raw) - 1)]),  # cut short
        st.sampled_from([b"\xff" * 11, b"\x0a\x02\xc3\x28", b"\x08" + b"\xff" * 10]),
    )  # fmt: skip


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(data=st.data())
async def test_bytes_that_are_no_request_are_refused_and_change_nothing(
    rpc: Rpc, known: Known, data: st.DataObject
) -> None:
    payload = data.draw(mutations(rpc, known.ids), label="payload")
    answer = await call(known.channels[rpc.service], rpc, payload)
    event(answer.code.name if answer.reason is None else f"{answer.code.name} {answer.reason}")
    judge(rpc, answer, repr(payload[:200]), len(payload))


@pytest.mark.parametrize("service", ["ledger", "reservation", "routing", "fulfilment"])
async def test_a_request_that_does_not_parse_is_invalid_argument(
    known: Known, service: str
) -> None:
    rpc = next(r for r in RPCS if r.service == service)
    answer = await call(known.channels[service], rpc, b"\xff" * 11)
    assert (answer.code, answer.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


async def test_a_request_over_the_message_size_limit_is_resource_exhausted(
    known: Known, settings: Settings
) -> None:
    limit = settings.grpc_max_message_bytes
    request = ledger_pb.PostMovementsRequest(
        movements=[
            ledger_res.MovementInput(
                key=ledger_res.IdempotencyKey(device_id=f"big-{uuid.uuid4().hex[:8]}", sequence=n),
                sku="SKU-1",
                location_id="store-1",
                receipt=ledger_res.Receipt(quantity=1, reference="r" * 1000),
            )
            for n in range(1, limit // 1000 + 50)
        ]
    )
    assert request.ByteSize() > limit
    rpc = next(r for r in RPCS if r.name == "PostMovements")
    answer = await call(known.channels["ledger"], rpc, request.SerializeToString())
    assert answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    assert str(limit) in answer.details, answer.details
    assert await _movement_keys(known.pool, request) == 0


async def test_after_the_fuzzing_every_service_serves_and_the_ledger_balances(
    known: Known,
) -> None:
    for name, channel in known.channels.items():
        reply = await health_check(channel)(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    async with known.pool.acquire() as conn:
        report = await audit(conn)
    assert report.ok, [str(finding) for finding in report.findings]


# -- what the fuzzer found, kept as plain tests ------------------------------------------------


def _token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


@pytest.mark.parametrize(
    "page_token",
    [
        _token("0001-01-01T00:00:00+14:00|00000000-0000-0000-0000-000000000000"),
        _token("9999-12-31T23:59:59-14:00|00000000-0000-0000-0000-000000000000"),
        _token("2026-01-01T00:00:00|00000000-0000-0000-0000-000000000000"),
        _token("2026-01-01|not-a-uuid"),
        _token("a|b|c"),
        "%%%",
        "x" * 5_000,
    ],
    ids=["year-1-east", "year-9999-west", "no-offset", "no-uuid", "three-parts", "not-b64", "huge"],
)
async def test_a_forged_queue_page_token_is_invalid_argument(known: Known, page_token: str) -> None:
    rpc = next(r for r in RPCS if r.name == "ListFulfilments")
    request = fulfilment_pb.ListFulfilmentsRequest(
        location_id=known.places["utrecht"], page_token=page_token
    )
    answer = await call(known.channels["fulfilment"], rpc, request.SerializeToString())
    assert (answer.code, answer.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token: is not a token this service gave",
    )


@pytest.fixture(scope="module")
async def untouched(
    known: Known, ledger: LedgerStub, reservations: ReservationStub, routing: RoutingStub
) -> Known:
    """A world of its own for the limit tests, which the fuzzer never changed (its
    channel rules, locations and safety stock), beside the fuzzed one's tasks."""
    world = World(Network(ledger), reservations, routing, known.pool)
    await world.build(
        {"utrecht": ("store", UTRECHT), "amsterdam": ("store", AMSTERDAM), "dc": ("dc", UTRECHT)},
        skus=2,
    )
    await world.known_to_routing()
    for sku in world.skus:
        await world.stock(sku, "utrecht", 20)
    return replace(
        known,
        channel=world.channel,
        skus=world.skus,
        places={name: world.id(name) for name in ("utrecht", "amsterdam", "dc")},
    )


async def _fresh_cart(k: Known) -> str:
    stub: ReservationStub = reservation_grpc.ReservationServiceStub(k.channels["reservation"])
    hold = await stub.Reserve(
        reservation_pb.ReserveRequest(
            request_id=f"fuzz-{uuid.uuid4().hex}",
            channel=k.channel,
            reference=f"cart-{uuid.uuid4().hex[:12]}",
            kind=reservation_res.RESERVATION_KIND_CART,
            lines=[reservation_pb.ReserveLine(sku=k.skus[0], location_id=k.places["utrecht"],
                                              quantity=1)],
        )
    )  # fmt: skip
    return hold.reservation.reservation_id


async def _accepted_task(k: Known) -> str:
    routing: RoutingStub = routing_grpc.OrderRoutingServiceStub(k.channels["routing"])
    fulfilment: FulfilmentStub = fulfilment_grpc.FulfilmentServiceStub(k.channels["fulfilment"])
    await restore_rules(k)
    request = _valid("RouteOrder", k, f"fuzz-{uuid.uuid4().hex[:16]}")
    assert isinstance(request, routing_pb.RouteOrderRequest)
    order = (await routing.RouteOrder(request)).order
    task = await _task_of(fulfilment, order.allocations[0].location_id, order.order_id)
    await _work(fulfilment, task, k.skus[1], 1)
    return task


async def _limit_request(case: str, k: Known) -> Message:
    uid = f"fuzz-{uuid.uuid4().hex[:16]}"
    match case:
        case "huge unknown excluded location":
            return routing_pb.SetRoutingRulesRequest(
                request_id=uid,
                rules=routing_res.RoutingRules(
                    time_zone="Europe/Amsterdam", excluded_location_ids=["💥" * 2_000]
                ),
            )
        case "huge time zone":
            return routing_pb.SetRoutingRulesRequest(
                request_id=uid, rules=routing_res.RoutingRules(time_zone="💥" * 5_000)
            )
        case "huge sku picked":
            return fulfilment_pb.ConfirmPickRequest(
                request_id=uid,
                fulfilment_id=await _accepted_task(k),
                lines=[fulfilment_pb.PickedLine(sku="💥" * 5_000, picked_quantity=1)],
            )
        case "too many SKUs picked":
            return fulfilment_pb.ConfirmPickRequest(
                request_id=uid,
                fulfilment_id=await _accepted_task(k),
                lines=[
                    fulfilment_pb.PickedLine(sku=f"SKU-{n}", picked_quantity=1) for n in range(101)
                ],
            )
        case "too many line numbers released":
            return reservation_pb.ReleaseReservationRequest(
                request_id=uid, reservation_id=await _fresh_cart(k), line_numbers=[1] * 101
            )
        case "too many line numbers cancelled":
            return routing_pb.CancelOrderRequest(
                request_id=uid,
                order_id=k.open_order,
                line_numbers=[1] * 101,
                reason_code="CUSTOMER_REQUEST",
            )
        case "long pickup code":
            return fulfilment_pb.CollectFulfilmentRequest(
                request_id=uid, fulfilment_id=k.ready_pickup, pickup_code="1" * 33
            )
        case "too many statuses":
            return fulfilment_pb.ListFulfilmentsRequest(
                location_id=k.places["utrecht"],
                statuses=[fulfilment_res.FULFILMENT_STATUS_CREATED] * 12,
            )
        case "page too big":
            return fulfilment_pb.ListFulfilmentsRequest(
                location_id=k.places["utrecht"], page_size=201
            )
        case "too many locations":
            return reservation_pb.GetAvailabilityRequest(
                channel=k.channel, skus=[k.skus[0]], location_ids=["loc"] * 10_001
            )
        case "too many units returned":
            request = _valid("RouteReturn", k, uid)
            assert isinstance(request, routing_pb.RouteReturnRequest)
            request.lines[0].quantity = 10_001
            return request
    raise AssertionError(case)


# (case, RPC, field named, words the message must hold)
LIMITS = [
    ("huge unknown excluded location", "SetRoutingRules", "rules.excluded_location_ids",
     "is malformed"),
    ("huge time zone", "SetRoutingRules", "rules.time_zone", "(5000 characters)"),
    ("huge sku picked", "ConfirmPick", "lines", "is malformed"),
    ("too many SKUs picked", "ConfirmPick", "lines", "at most 100 SKUs per request, got 101"),
    ("too many line numbers released", "ReleaseReservation", "line_numbers", "at most 100"),
    ("too many line numbers cancelled", "CancelOrder", "line_numbers",
     "at most 100 line numbers per request, got 101"),
    ("long pickup code", "CollectFulfilment", "pickup_code", "at most 32"),
    ("too many statuses", "ListFulfilments", "statuses", "at most 11 statuses per request"),
    ("page too big", "ListFulfilments", "page_size", "to 200"),
    ("too many locations", "GetAvailability", "location_ids", "at most 10000 locations"),
    ("too many units returned", "RouteReturn", "lines[0].quantity", "at most 10000"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "field_name", "words"), LIMITS, ids=[c[0] for c in LIMITS]
)
async def test_each_input_limit_is_invalid_argument_naming_the_field_and_the_limit(
    untouched: Known, case: str, method: str, field_name: str, words: str
) -> None:
    known = untouched
    rpc = next(r for r in RPCS if r.name == method)
    request = await _limit_request(case, known)
    try:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = known.channels[
            rpc.service
        ].unary_unary(rpc.path)
        await unary(request.SerializeToString(), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        refused = error
    else:
        raise AssertionError(f"{case}: {method} accepted {describe(request)}")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    found = bad_request(refused)
    assert found is not None
    named = {v.field: v.description for v in found.field_violations}
    assert field_name in named, named
    assert words in named[field_name] or words in (refused.details() or ""), named
    # Errors travel in metadata, which clients refuse above 8 KB: never echo input whole.
    assert len(refused.details() or "") < 500, refused.details()


async def test_one_client_holds_at_most_its_limit_of_watch_streams(untouched: Known) -> None:
    stub: ReservationStub = reservation_grpc.ReservationServiceStub(
        untouched.channels["reservation"]
    )
    request = reservation_pb.WatchAvailabilityRequest(
        channel=untouched.channel, skus=[untouched.skus[0]]
    )
    streams = []
    try:
        for _ in range(MAX_WATCHES_PER_CLIENT):
            stream = stub.WatchAvailability(request, timeout=30)
            first = await stream.read()
            assert isinstance(first, reservation_pb.WatchAvailabilityResponse) and first.snapshot
            streams.append(stream)
        one_more = stub.WatchAvailability(request, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await one_more.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused.value)
        assert info is not None and info.reason == "TOO_MANY_WATCHES"
        assert str(MAX_WATCHES_PER_CLIENT) in (refused.value.details() or "")
        streams.pop().cancel()
        await asyncio.sleep(0.2)  # the server sees the cancellation
        again = stub.WatchAvailability(request, timeout=30)
        streams.append(again)
        first = await again.read()
        assert isinstance(first, reservation_pb.WatchAvailabilityResponse) and first.snapshot
    finally:
        for stream in streams:
            stream.cancel()
