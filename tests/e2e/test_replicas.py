"""Two processes of every service share the work without doing anything twice.

One stack runs two replicas of the ledger, the reservation service, routing
and fulfilment on one database and one nats-server: the replicas of a service
share its durable consumers, and each runs its sweepers. Clients call either
replica. On a network of a capacity-limited store, a second store and a
distribution centre, everything happens at once:

- a scanner's batch of receipts is posted to both ledger replicas at the same
  time, twice to each: every movement is recorded once, and on-hand grows once;
- ship-to-home orders are routed concurrently through both routing replicas
  while the nearby store may take only ``CAPACITY`` orders today: its capacity
  counter ends at exactly the orders it was given, never more, and the other
  orders go to the distribution centre;
- every routed plan gets exactly one fulfilment task per source (one
  ``FulfilmentCreated`` each, though both fulfilment replicas consume
  ``OrderRouted``), and the stores ship them through either replica;
- cart holds whose time to live runs out while both reservation replicas sweep
  are released exactly once each (one ``ReservationExpired`` per hold, none
  released otherwise), and the units are available again;
- click-and-collect orders nobody collects expire once each with both
  fulfilment sweepers running (one ``FulfilmentExpired`` per task), and their
  order holds are released once each;
- each replica's expiry sweeper ran, and their item counters add up to exactly
  the holds and pickups that expired (``omni_sweeper_items_total``).

Afterwards no event was dead-lettered and the ledger audit, the holds and every
availability figure check out.
"""

from __future__ import annotations

import asyncio
import functools
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from prometheus_client.parser import text_string_to_metric_families

from omni.common.v1 import event_pb2
from omni.fulfilment.v1 import events_pb2 as fulfilment_events
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.reservation.v1 import events_pb2 as reservation_events
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import resources_pb2 as reservation_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omnistock.devstack.stack import EmbeddedStack
from omnistock.messaging.envelope import unpack
from omnistock.nats_client import connect
from omnistock.settings import ServiceName
from tests.e2e.harness import (
    FulfilmentStub,
    Place,
    ProcessStack,
    ScenarioNetwork,
    assert_consistent,
    dead_letters,
    eventually,
    open_process_stack,
    order_of,
    task_for,
)

T = TypeVar("T")

REPLICAS = 2
UTRECHT = (52.0907, 5.1214)
AMSTERDAM = (52.3740, 4.8897)
GRONINGEN = (53.2194, 6.5665)
NIEUWEGEIN = (52.0292, 5.0806)  # customers next to the Utrecht store

CAPACITY = 3  # orders a day the Utrecht store may take
ORDERS = 10  # ship-to-home orders, more than the store may take
CARTS = 8
PICKUPS = 3
PICKUP_WINDOW_SECONDS = 3.0
STOCK = {"utrecht": 40, "north": 100, "amsterdam": 30}

PLACES = [
    Place("utrecht", "store", UTRECHT, daily_capacity=CAPACITY),
    Place("amsterdam", "store", AMSTERDAM),
    Place("north", "dc", GRONINGEN),
]
RETRYABLE = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE})


async def until_answered(call: Callable[[], Awaitable[T]], what: str, within: int = 20) -> T:
    """The call's answer, retrying the same request on a conflict a retry resolves."""
    for _ in range(within * 4):
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what}: no answer after {within} s of retries")


async def stream_events(stack: ProcessStack, stream: str) -> list[event_pb2.EventEnvelope]:
    """Every event on ``stream`` (the stack has a nats-server of its own)."""
    client = await connect(stack.nats_url, name="omnistock-e2e-replicas")
    try:
        js = client.jetstream()
        end = (await js.stream_info(stream)).state.last_seq
        subscription = await js.pull_subscribe("omni.>", stream=stream)
        envelopes: list[event_pb2.EventEnvelope] = []
        last = 0
        while last < end:
            for message in await subscription.fetch(500, timeout=5):
                envelopes.append(event_pb2.EventEnvelope.FromString(message.data))
                last = message.metadata.sequence.stream
                await message.ack()
        await subscription.unsubscribe()
    finally:
        await client.close()
    return envelopes


async def hold_of(stack: ProcessStack, reservation_id: str) -> reservation_res.Reservation:
    """GetReservation."""
    found = await stack.reservations.GetReservation(
        reservation_pb.GetReservationRequest(reservation_id=reservation_id)
    )
    return found.reservation


async def sweeper_counts(
    stack: ProcessStack, service: ServiceName, sweeper: str
) -> list[tuple[float, float]]:
    """(cycles run, items acted on) of one sweeper, per replica of ``service``."""

    def read(port: int) -> tuple[float, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        runs = items = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("sweeper") != sweeper:
                    continue
                if sample.name == "omni_sweeper_runs_total" and sample.labels["outcome"] == "ok":
                    runs += sample.value
                elif sample.name == "omni_sweeper_items_total":
                    items += sample.value
        return runs, items

    return [await asyncio.to_thread(read, run.metrics_port) for run in stack.replicas_of(service)]


async def ship_via(fulfilment: FulfilmentStub, task: fulfilment_res.Fulfilment) -> None:
    """Accept, pick all, pack and ship a task through one fulfilment replica."""
    task_id = task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(request_id=f"accept-{task_id}", fulfilment_id=task_id)
    )
    await fulfilment.ConfirmPick(
        fulfilment_pb.ConfirmPickRequest(
            request_id=f"pick-{task_id}",
            fulfilment_id=task_id,
            lines=[
                fulfilment_pb.PickedLine(sku=item.sku, picked_quantity=item.quantity)
                for item in task.items
            ],
        )
    )
    await fulfilment.PackFulfilment(
        fulfilment_pb.PackFulfilmentRequest(request_id=f"pack-{task_id}", fulfilment_id=task_id)
    )
    shipped = await fulfilment.ShipFulfilment(
        fulfilment_pb.ShipFulfilmentRequest(
            request_id=f"ship-{task_id}",
            fulfilment_id=task_id,
            carrier="postnl",
            tracking_number=f"3S{task_id[:8].upper()}",
        )
    )
    assert shipped.fulfilment.status == fulfilment_res.FULFILMENT_STATUS_SHIPPED


async def set_aside_via(
    fulfilment: FulfilmentStub, task: fulfilment_res.Fulfilment
) -> fulfilment_res.Fulfilment:
    """Accept, pick and mark a pickup task ready through one fulfilment replica."""
    task_id = task.fulfilment_id
    await fulfilment.AcceptFulfilment(
        fulfilment_pb.AcceptFulfilmentRequest(request_id=f"accept-{task_id}", fulfilment_id=task_id)
    )
    await fulfilment.ConfirmPick(
        fulfilment_pb.ConfirmPickRequest(
            request_id=f"pick-{task_id}",
            fulfilment_id=task_id,
            lines=[
                fulfilment_pb.PickedLine(sku=item.sku, picked_quantity=item.quantity)
                for item in task.items
            ],
        )
    )
    ready = await fulfilment.MarkReadyForPickup(
        fulfilment_pb.MarkReadyForPickupRequest(
            request_id=f"ready-{task_id}", fulfilment_id=task_id
        )
    )
    return ready.fulfilment


# -- the parts of the scenario ------------------------------------------------------------


async def receive_through_both_ledgers(stack: ProcessStack, net: ScenarioNetwork) -> None:
    """One scanner batch posted to both ledger replicas at once, twice each: every
    movement is recorded once and on-hand grows once."""
    ship_sku, pickup_sku = net.skus
    stocked = [
        (ship_sku, "utrecht", STOCK["utrecht"]),
        (ship_sku, "north", STOCK["north"]),
        (pickup_sku, "amsterdam", STOCK["amsterdam"]),
    ]
    for sku, place, _ in stocked:  # the reservation service has heard of the SKU
        await eventually(functools.partial(net.available, sku, place), lambda _: True)
    request = ledger_pb.PostMovementsRequest(
        movements=[
            ledger_res.MovementInput(
                key=net.next_key(),
                sku=sku,
                location_id=net.id(place),
                receipt=ledger_res.Receipt(quantity=units, reference=f"delivery-{net.tag}"),
            )
            for sku, place, units in stocked
        ]
    )

    def post(replica: int) -> Callable[[], Awaitable[ledger_pb.PostMovementsResponse]]:
        async def call() -> ledger_pb.PostMovementsResponse:
            return await stack.ledger_replica(replica).PostMovements(request)

        return call

    answers = await asyncio.gather(
        *(
            until_answered(post(replica), f"PostMovements to ledger replica {replica}")
            for replica in [0, 1, 0, 1]
        )
    )
    for index in range(len(stocked)):
        recorded = {answer.results[index].movement.movement_id for answer in answers}
        firsts = [answer.results[index].replayed for answer in answers].count(False)
        assert len(recorded) == 1 and firsts == 1, (
            f"movement {index} was answered as {len(recorded)} movement(s), {firsts} of the "
            "four answers recorded it (not replayed); want one movement, recorded once"
        )
    pool = await stack.pool()
    rows = await pool.fetch(
        "SELECT device_sequence, count(*) AS n FROM ledger.movements WHERE device_id = $1 "
        "GROUP BY device_sequence",
        f"e2e-{net.tag}",
    )
    assert sorted((r["device_sequence"], r["n"]) for r in rows) == [
        (m.key.sequence, 1) for m in request.movements
    ]
    for sku, place, units in stocked:
        await eventually(
            functools.partial(net.available, sku, place),
            functools.partial(int.__eq__, units),
            what=f"{units} x {sku} available at {place}, counted once",
        )


async def route_ship_orders(stack: ProcessStack, net: ScenarioNetwork) -> list[routing_res.Order]:
    """ORDERS ship-to-home orders next to the Utrecht store, all at once, alternately
    through each routing replica."""
    ship_sku = net.skus[0]
    requests = [net.order([(ship_sku, 1)], to=NIEUWEGEIN) for _ in range(ORDERS)]

    def route(n: int) -> Callable[[], Awaitable[routing_pb.RouteOrderResponse]]:
        async def call() -> routing_pb.RouteOrderResponse:
            return await stack.routing_replica(n % REPLICAS).RouteOrder(requests[n])

        return call

    answers = await asyncio.gather(
        *(until_answered(route(n), f"RouteOrder {r.order_id}") for n, r in enumerate(requests))
    )
    orders = [answer.order for answer in answers]
    for order in orders:
        assert order.status == routing_res.ORDER_STATUS_ROUTED, (
            f"{order.order_id} is {routing_res.OrderStatus.Name(order.status)}: "
            f"{order.attention_reason!r}"
        )
    return orders


async def capacity_problems(stack: ProcessStack, net: ScenarioNetwork) -> list[str]:
    """The Utrecht store's counter against the orders routing gave it."""
    pool = await stack.pool()
    store = net.id("utrecht")
    usage = await pool.fetch(
        "SELECT day, used FROM routing.capacity_usage WHERE location_id = $1", store
    )
    counted = await pool.fetch(
        "SELECT day, count(*) AS n FROM routing.order_sources WHERE location_id = $1 GROUP BY day",
        store,
    )
    given = await pool.fetchval(
        "SELECT count(DISTINCT order_id) FROM routing.allocations WHERE location_id = $1", store
    )
    problems: list[str] = []
    used = {row["day"]: row["used"] for row in usage}
    orders_counted = {row["day"]: row["n"] for row in counted}
    if used != orders_counted:
        problems.append(f"capacity used per day {used}, orders counted per day {orders_counted}")
    if any(n > CAPACITY for n in used.values()):
        problems.append(f"the store took {used} orders, over its capacity of {CAPACITY}")
    if sum(used.values()) != given:
        problems.append(f"the counter says {sum(used.values())}, routing gave it {given} orders")
    if sum(used.values()) != CAPACITY:
        problems.append(
            f"{ORDERS} orders next to the store filled {sum(used.values())} of its {CAPACITY} "
            "places; the scenario wants it full"
        )
    return problems


async def ship_every_order(
    stack: ProcessStack, orders: list[routing_res.Order]
) -> list[fulfilment_res.Fulfilment]:
    """Each order's task shipped by its location, alternately through each fulfilment
    replica."""
    tasks: list[fulfilment_res.Fulfilment] = []
    for order in orders:
        for location_id in sorted({a.location_id for a in order.allocations}):
            tasks.append(await task_for(stack, location_id, order.order_id))
    await asyncio.gather(
        *(ship_via(stack.fulfilment_replica(n % REPLICAS), task) for n, task in enumerate(tasks))
    )
    for order in orders:
        await eventually(
            functools.partial(order_of, stack, order.order_id),
            lambda o: o.status == routing_res.ORDER_STATUS_FULFILLED,
            what=f"{order.order_id} fulfilled",
        )
    return tasks


async def place_carts(stack: ProcessStack, net: ScenarioNetwork) -> list[str]:
    """CARTS cart holds of one unit at Amsterdam, through either reservation replica,
    whose time to live is then cut to a second (the service's minimum is a minute)."""
    pickup_sku = net.skus[1]
    holds = await asyncio.gather(
        *(
            stack.reservations_replica(n % REPLICAS).Reserve(
                reservation_pb.ReserveRequest(
                    request_id=net.request_id(f"cart-{n}"),
                    channel=net.channel,
                    reference=f"cart-{net.tag}-{n}",
                    kind=reservation_res.RESERVATION_KIND_CART,
                    lines=[
                        reservation_pb.ReserveLine(
                            sku=pickup_sku, location_id=net.id("amsterdam"), quantity=1
                        )
                    ],
                    ttl=Duration(seconds=60),
                )
            )
            for n in range(CARTS)
        )
    )
    ids = [hold.reservation.reservation_id for hold in holds]
    pool = await stack.pool()
    await pool.execute(
        "UPDATE reservation.reservations SET expires_at = now() + interval '1 second' "
        "WHERE reservation_id = ANY($1::uuid[])",
        ids,
    )
    return ids


async def pickups_nobody_collects(
    stack: ProcessStack, net: ScenarioNetwork
) -> list[fulfilment_res.Fulfilment]:
    """PICKUPS click-and-collect orders at Amsterdam, set aside through either
    fulfilment replica; nobody comes."""
    pickup_sku = net.skus[1]
    ready = []
    for n in range(PICKUPS):
        request = net.order([(pickup_sku, 1)], pickup="amsterdam")
        routing = stack.routing_replica(n % REPLICAS)

        async def route() -> routing_pb.RouteOrderResponse:
            return await routing.RouteOrder(request)  # noqa: B023 (awaited in this turn)

        routed = await until_answered(route, f"RouteOrder {request.order_id}")
        task = await task_for(stack, net.id("amsterdam"), routed.order.order_id)
        assert task.type == fulfilment_res.FULFILMENT_TYPE_PICKUP_AT_STORE
        ready.append(await set_aside_via(stack.fulfilment_replica((n + 1) % REPLICAS), task))
    return ready


# -- the test -----------------------------------------------------------------------------


async def test_two_replicas_of_each_service_share_the_work_without_doing_anything_twice(
    e2e_servers: EmbeddedStack, tmp_path: Path
) -> None:
    overrides = {"OMNI_FULFILMENT_PICKUP_WINDOW_DAYS": PICKUP_WINDOW_SECONDS / 86400}
    async with open_process_stack(
        e2e_servers, tmp_path / "replicas", overrides, replicas=REPLICAS
    ) as stack:
        assert len(stack.runs) == 4 * REPLICAS and all(run.running for run in stack.runs)
        net = await ScenarioNetwork(stack).build(PLACES, skus=2)
        ship_sku, pickup_sku = net.skus
        await receive_through_both_ledgers(stack, net)

        # Carts, pickups and ship orders all at once.
        carts, pickups, orders = await asyncio.gather(
            place_carts(stack, net),
            pickups_nobody_collects(stack, net),
            route_ship_orders(stack, net),
        )
        assert await capacity_problems(stack, net) == []
        tasks = await ship_every_order(stack, orders)

        # Every cart hold expires once, with both reservation sweepers running.
        for reservation_id in carts:
            await eventually(
                functools.partial(hold_of, stack, reservation_id),
                lambda hold: hold.status == reservation_res.RESERVATION_STATUS_EXPIRED,
                what=f"cart hold {reservation_id} expired",
            )
        # Every pickup expires once, with both fulfilment sweepers running; the
        # orders end and their holds are released.
        for task in pickups:
            await eventually(
                functools.partial(order_of, stack, task.order_id),
                lambda o: o.status == routing_res.ORDER_STATUS_CANCELLED,
                what=f"order {task.order_id} ends with its expired pickup",
            )
        await eventually(
            lambda: net.available(pickup_sku, "amsterdam"),
            lambda units: units == STOCK["amsterdam"],
            what="every expired cart and pickup unit is available again",
        )

        reservation_stream = await stream_events(stack, "OMNI_RESERVATION")
        expired_holds = Counter(
            event.reservation.reservation_id
            for event in (
                unpack(e, reservation_events.ReservationExpired) for e in reservation_stream
            )
            if event is not None
        )
        assert {hold: expired_holds[hold] for hold in carts} == dict.fromkeys(carts, 1)
        assert sum(expired_holds.values()) == CARTS
        # The pickups' order holds were let go once each, and no cart hold was
        # released besides expiring.
        released = Counter(
            event.reservation.reservation_id
            for event in (
                unpack(e, reservation_events.ReservationReleased) for e in reservation_stream
            )
            if event is not None
        )
        pickup_holds = {
            allocation.reservation_id
            for task in pickups
            for allocation in (await order_of(stack, task.order_id)).allocations
        }
        assert {hold: released[hold] for hold in pickup_holds} == dict.fromkeys(pickup_holds, 1)
        assert not set(carts) & set(released)
        # Both replicas' sweepers ran; between them they expired each hold and
        # each pickup once.
        reservation_sweeps = await sweeper_counts(stack, "reservation", "reservation-expiry")
        fulfilment_sweeps = await sweeper_counts(stack, "fulfilment", "fulfilment-expiry")
        assert all(runs > 0 for runs, _ in reservation_sweeps + fulfilment_sweeps), (
            reservation_sweeps,
            fulfilment_sweeps,
        )
        assert sum(items for _, items in reservation_sweeps) == CARTS, reservation_sweeps
        assert sum(items for _, items in fulfilment_sweeps) == PICKUPS, fulfilment_sweeps

        fulfilment_stream = await stream_events(stack, "OMNI_FULFILMENT")
        expired_tasks = Counter(
            event.fulfilment_id
            for event in (unpack(e, fulfilment_events.FulfilmentExpired) for e in fulfilment_stream)
            if event is not None
        )
        assert expired_tasks == Counter({task.fulfilment_id: 1 for task in pickups})

        # One task per plan and source, announced once, however many consumers.
        created = [
            event.fulfilment
            for event in (unpack(e, fulfilment_events.FulfilmentCreated) for e in fulfilment_stream)
            if event is not None
        ]
        announced = Counter(task.fulfilment_id for task in created)
        assert [task_id for task_id, n in announced.items() if n != 1] == []
        pool = await stack.pool()
        task_rows = await pool.fetch(
            "SELECT fulfilment_id::text AS id, order_id, plan_number, location_id "
            "FROM fulfilment.fulfilments WHERE channel = $1",
            net.channel,
        )
        assert sorted(announced) == sorted(row["id"] for row in task_rows)
        allocated = await pool.fetch(
            "SELECT DISTINCT a.order_id, a.plan_number, a.location_id FROM routing.allocations a "
            "JOIN routing.orders o USING (order_id) WHERE o.channel = $1",
            net.channel,
        )
        per_plan: dict[tuple[str, int, str], int] = defaultdict(int)
        for row in task_rows:
            per_plan[(row["order_id"], row["plan_number"], row["location_id"])] += 1
        assert per_plan == {
            (row["order_id"], row["plan_number"], row["location_id"]): 1 for row in allocated
        }
        assert len(tasks) == ORDERS

        # The counter is still right after the shipments, nothing was dead-lettered,
        # and everything adds up.
        assert await capacity_problems(stack, net) == []
        assert (await dead_letters(stack))[0] == 0
        await assert_consistent(stack, channels=[net.channel])
        assert await net.available(ship_sku, "utrecht") == STOCK["utrecht"] - CAPACITY
        assert all(run.running for run in stack.runs)
