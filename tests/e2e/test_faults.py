"""Crashes under load: every process SIGKILLed in turn while orders and scans keep coming.

A network of three stores and a distribution centre with ample stock runs a
steady load for the whole test:

- *channel* workers route small ship-to-home orders, each attempt retried with
  the same request and order id until the routing service acknowledges it;
- *store* workers work every location's queue (accept, pick everything, pack,
  ship), each step retried with the same request id;
- *scanner* workers post receipts under their own device id and increasing
  sequence numbers, each batch retried with the same keys.

Meanwhile the ledger, the reservation service, routing and fulfilment are each
SIGKILLed and restarted in turn, then nats-server. Then the load stops, the
stores finish their queues and the test checks what must hold whatever
crashed when:

1. no order stuck: every call in flight when the load stopped is answered
   within a bound, and every order routing knows (every acknowledged one among
   them) ends FULFILLED, shipped exactly once for exactly its units;
2. no movement lost or counted twice: every acknowledged scanner key is
   exactly one receipt in the ledger, an unacknowledged one at most one, every
   shipped task is exactly its shipment there, and the ledger's on-hand per
   (sku, location) is the initial stock + the receipts - the shipped units;
3. the ledger audit, the holds and every availability figure check out;
4. no event was given up on (no dead letter).

The system converges asynchronously, and a message a crash left unacknowledged
comes back only after JetStream's ack wait (30 s), as does an order whose
routing pass a crash interrupted (its lease): so the checks poll, each within
its own bound, and the whole test stops after ``TEST_WITHIN`` seconds at most.
A failure names every problem with the phase it arose in and the run's numbers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import grpc

from omni.common.v1 import event_pb2, types_pb2
from omni.fulfilment.v1 import fulfilment_service_pb2 as fulfilment_pb
from omni.fulfilment.v1 import resources_pb2 as fulfilment_res
from omni.ledger.v1 import events_pb2 as ledger_events
from omni.ledger.v1 import ledger_service_pb2 as ledger_pb
from omni.ledger.v1 import resources_pb2 as ledger_res
from omni.routing.v1 import resources_pb2 as routing_res
from omni.routing.v1 import routing_service_pb2 as routing_pb
from omnistock.contract import FULFILMENT_DEVICE_PREFIX
from tests.e2e.harness import (
    SERVICES,
    Place,
    ProcessStack,
    ScenarioNetwork,
    StackStarter,
    assert_consistent,
    consumer_failures,
    dead_letters,
)

T = TypeVar("T")

UTRECHT = (52.0907, 5.1214)
AMSTERDAM = (52.3740, 4.8897)
ROTTERDAM = (51.9225, 4.4792)
GRONINGEN = (53.2194, 6.5665)
# Where the customers live: near each store, and near the distribution centre.
CUSTOMERS = [
    (52.0292, 5.0806),  # Nieuwegein
    (52.1561, 5.3878),  # Amersfoort
    (52.3874, 4.6462),  # Haarlem
    (52.3508, 4.9392),  # Amsterdam-Oost
    (52.0705, 4.3007),  # The Hague
    (51.8126, 4.6901),  # Dordrecht
    (52.5168, 6.0830),  # Zwolle
    (52.9925, 6.5649),  # Assen
]
PLACES = [
    Place("utrecht", "store", UTRECHT),
    Place("amsterdam", "store", AMSTERDAM),
    Place("rotterdam", "store", ROTTERDAM),
    Place("north", "dc", GRONINGEN),
]
SKUS = 4
# Far more than the run can sell: every order can be sourced from its first plan.
INITIAL_STOCK = {"utrecht": 300, "amsterdam": 300, "rotterdam": 300, "north": 1000}

CHANNEL_WORKERS = 2
SCANNERS = 2
LOAD_BEFORE_FIRST_FAULT = 3.0
DOWN_FOR = 1.0  # seconds a killed process stays dead while the load goes on
LOAD_AFTER_RESTART = 3.0
# In-flight calls keep retrying this long after the load stops. A routing pass
# that a SIGKILL interrupted is resumed when its 30-second lease ends.
IN_FLIGHT_WITHIN = 45.0
SETTLE_WITHIN = 45.0  # every order final, after the load stopped
# The ledger's postings, the holds and availability catch up after the orders settled.
CONVERGE_WITHIN = 40.0
TEST_WITHIN = 200.0  # a hard stop for the whole scenario

CALL_TIMEOUT = 5.0
RETRY_PAUSE = 0.2
# What a client meets while a process restarts: it retries with the same ids.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,  # ORDER_BUSY, DEPENDENCY_UNAVAILABLE, CONCURRENT_UPDATE
    }
)
OPEN_TASKS = [
    fulfilment_res.FULFILMENT_STATUS_CREATED,
    fulfilment_res.FULFILMENT_STATUS_ACCEPTED,
    fulfilment_res.FULFILMENT_STATUS_PICKED,
    fulfilment_res.FULFILMENT_STATUS_PACKED,
]
SHIP_KINDS = (
    fulfilment_res.FULFILMENT_TYPE_SHIP_FROM_STORE,
    fulfilment_res.FULFILMENT_TYPE_SHIP_FROM_DISTRIBUTION_CENTRE,
)


# -- what the load did -----------------------------------------------------------------


@dataclass
class OrderAttempt:
    """One order a channel tried to route, with the one request it kept sending."""

    request: routing_pb.RouteOrderRequest
    phase: str
    attempts: int = 0
    acknowledged: bool = False


@dataclass
class ScanKey:
    """One receipt a scanner posted under one key."""

    device_id: str
    sequence: int
    sku: str
    location_id: str
    units: int
    phase: str
    acknowledged: bool = False
    replayed: bool = False  # acknowledged by a retry that found it recorded already


@dataclass
class Shipment:
    """A task a store shipped: the units that left, per SKU."""

    fulfilment_id: str
    order_id: str
    location_id: str
    units: Counter[str]
    phase: str


@dataclass
class Run:
    """The shared record of the load and the faults."""

    stack: ProcessStack
    net: ScenarioNetwork
    phase: str = "warm-up"
    phases: list[str] = field(default_factory=list)
    orders: dict[str, OrderAttempt] = field(default_factory=dict)
    keys: dict[tuple[str, int], ScanKey] = field(default_factory=dict)
    shipments: dict[str, Shipment] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    stop_load: asyncio.Event = field(default_factory=asyncio.Event)
    stop_stores: asyncio.Event = field(default_factory=asyncio.Event)
    give_up_at: float = float("inf")

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phases.append(f"{phase} at {_clock(datetime.now(UTC))}")

    def unexpected_error(self, what: str, detail: str) -> None:
        self.unexpected.append(f"[{self.phase}] {what}: {detail}")

    def summary(self) -> str:
        acked = sum(o.acknowledged for o in self.orders.values())
        keys = list(self.keys.values())
        per_phase: dict[str, Counter[str]] = defaultdict(Counter)
        for order in self.orders.values():
            per_phase[order.phase]["orders"] += 1
            per_phase[order.phase]["orders acked"] += order.acknowledged
        for key in keys:
            per_phase[key.phase]["scans"] += 1
            per_phase[key.phase]["scans acked"] += key.acknowledged
        for shipment in self.shipments.values():
            per_phase[shipment.phase]["tasks shipped"] += 1
        names = [phase.split(" at ")[0] for phase in self.phases]
        phases = "\n".join(
            f"    {phase}: {dict(per_phase[phase])}" for phase in names if phase in per_phase
        )
        return (
            f"last phase: {self.phase}\n"
            f"  orders: {len(self.orders)} sent, {acked} acknowledged, "
            f"{sum(o.attempts > 1 for o in self.orders.values())} needed retries\n"
            f"  scanner keys: {len(keys)} sent, {sum(k.acknowledged for k in keys)} "
            f"acknowledged, {sum(k.replayed for k in keys)} acknowledged as replays "
            f"(committed before the failure their first attempt saw)\n"
            f"  tasks shipped: {len(self.shipments)}\n"
            f"  retried calls: {dict(self.retries)}\n"
            f"  unexpected errors: {len(self.unexpected)}\n"
            f"  per phase (by when it was sent):\n{phases}\n"
            f"  phases: {'; '.join(self.phases)}"
        )


async def until_acknowledged(
    run: Run, what: str, call: Callable[[], Awaitable[T]], give_up: Callable[[], bool]
) -> T | None:
    """Send the same call until it is answered; ``None`` after an error a retry cannot
    cure (recorded as unexpected) or once ``give_up`` says so."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                run.unexpected_error(what, f"{error.code().name}: {error.details()}")
                return None
            run.retries[f"{what.split()[0]} {error.code().name}"] += 1
        if give_up():
            return None
        await asyncio.sleep(RETRY_PAUSE)


# -- the workers -----------------------------------------------------------------------


async def channel_worker(run: Run, number: int) -> None:
    """Route small ship-to-home orders, each until acknowledged."""
    rng = random.Random(100 + number)
    net, routing = run.net, run.stack.routing
    while not run.stop_load.is_set():
        lines = [(sku, rng.randint(1, 2)) for sku in rng.sample(net.skus, rng.randint(1, 2))]
        request = net.order(lines, to=rng.choice(CUSTOMERS))
        attempt = OrderAttempt(request, run.phase)
        run.orders[request.order_id] = attempt

        async def route(
            request: routing_pb.RouteOrderRequest = request, attempt: OrderAttempt = attempt
        ) -> routing_pb.RouteOrderResponse:
            attempt.attempts += 1
            return await routing.RouteOrder(request, timeout=CALL_TIMEOUT)

        answer = await until_acknowledged(
            run,
            f"RouteOrder {request.order_id}",
            route,
            lambda: time.monotonic() > run.give_up_at,
        )
        if answer is not None:
            attempt.acknowledged = True
            if answer.order.status != routing_res.ORDER_STATUS_ROUTED:
                run.unexpected_error(
                    f"RouteOrder {request.order_id}",
                    f"answered {routing_res.OrderStatus.Name(answer.order.status)} "
                    f"with stock to spare: {answer.order.attention_reason!r}",
                )
        await asyncio.sleep(rng.uniform(0.05, 0.25))


async def scanner_worker(run: Run, number: int) -> None:
    """Post receipts in batches of one to three, each batch until acknowledged."""
    rng = random.Random(200 + number)
    net, ledger = run.net, run.stack.ledger
    device = f"scanner-{net.tag}-{number}"
    sequence = 0
    while not run.stop_load.is_set():
        keys: list[ScanKey] = []
        for _ in range(rng.randint(1, 3)):
            sequence += 1
            key = ScanKey(
                device,
                sequence,
                rng.choice(net.skus),
                net.id(rng.choice(PLACES).name),
                rng.randint(1, 5),
                run.phase,
            )
            run.keys[(device, sequence)] = key
            keys.append(key)
        request = ledger_pb.PostMovementsRequest(
            movements=[
                ledger_res.MovementInput(
                    key=ledger_res.IdempotencyKey(device_id=k.device_id, sequence=k.sequence),
                    sku=k.sku,
                    location_id=k.location_id,
                    receipt=ledger_res.Receipt(
                        quantity=k.units, reference=f"delivery-{k.sequence}"
                    ),
                )
                for k in keys
            ]
        )
        attempts = 0

        async def post(
            request: ledger_pb.PostMovementsRequest = request,
        ) -> ledger_pb.PostMovementsResponse:
            nonlocal attempts
            attempts += 1
            return await ledger.PostMovements(request, timeout=CALL_TIMEOUT)

        what = f"PostMovements {device}:{keys[0].sequence}-{keys[-1].sequence}"
        answer = await until_acknowledged(
            run, what, post, lambda: time.monotonic() > run.give_up_at
        )
        if answer is not None:
            for key, result in zip(keys, answer.results, strict=True):
                key.acknowledged = True
                key.replayed = result.replayed
                if result.replayed and attempts == 1:
                    run.unexpected_error(what, f"a first post of {key} was answered as a replay")
        await asyncio.sleep(rng.uniform(0.05, 0.2))


async def store_worker(run: Run, location_id: str) -> None:
    """Work the location's queue, oldest task first, until told to stop."""
    fulfilment = run.stack.fulfilment

    def stopped() -> bool:
        return run.stop_stores.is_set()

    while not stopped():
        page = await until_acknowledged(
            run,
            f"ListFulfilments {location_id}",
            lambda: fulfilment.ListFulfilments(
                fulfilment_pb.ListFulfilmentsRequest(
                    location_id=location_id, statuses=OPEN_TASKS, page_size=200
                ),
                timeout=CALL_TIMEOUT,
            ),
            stopped,
        )
        tasks = list(page.fulfilments) if page is not None else []
        for task in tasks:
            if stopped():
                return
            await work_task(run, task, stopped)
        if not tasks:
            await asyncio.sleep(0.2)


async def work_task(run: Run, task: fulfilment_res.Fulfilment, stopped: Callable[[], bool]) -> None:
    """Take a ship task from where it is to SHIPPED, every step with a request id of
    its own that a retry repeats."""
    fulfilment = run.stack.fulfilment
    task_id = task.fulfilment_id
    if task.type not in SHIP_KINDS:
        run.unexpected_error(f"task {task_id}", f"a ship-to-home order made {task}")
        return
    status = task.status
    while True:
        call: Callable[[], Awaitable[fulfilment_res.Fulfilment]]
        if status == fulfilment_res.FULFILMENT_STATUS_CREATED:
            step, wanted = "AcceptFulfilment", fulfilment_res.FULFILMENT_STATUS_ACCEPTED

            async def call() -> fulfilment_res.Fulfilment:
                return (
                    await fulfilment.AcceptFulfilment(
                        fulfilment_pb.AcceptFulfilmentRequest(
                            request_id=f"accept-{task_id}", fulfilment_id=task_id
                        ),
                        timeout=CALL_TIMEOUT,
                    )
                ).fulfilment

        elif status == fulfilment_res.FULFILMENT_STATUS_ACCEPTED:
            step, wanted = "ConfirmPick", fulfilment_res.FULFILMENT_STATUS_PICKED

            async def call() -> fulfilment_res.Fulfilment:
                return (
                    await fulfilment.ConfirmPick(
                        fulfilment_pb.ConfirmPickRequest(
                            request_id=f"pick-{task_id}",
                            fulfilment_id=task_id,
                            lines=[
                                fulfilment_pb.PickedLine(
                                    sku=item.sku, picked_quantity=item.quantity
                                )
                                for item in task.items
                            ],
                        ),
                        timeout=CALL_TIMEOUT,
                    )
                ).fulfilment

        elif status == fulfilment_res.FULFILMENT_STATUS_PICKED:
            step, wanted = "PackFulfilment", fulfilment_res.FULFILMENT_STATUS_PACKED

            async def call() -> fulfilment_res.Fulfilment:
                return (
                    await fulfilment.PackFulfilment(
                        fulfilment_pb.PackFulfilmentRequest(
                            request_id=f"pack-{task_id}", fulfilment_id=task_id
                        ),
                        timeout=CALL_TIMEOUT,
                    )
                ).fulfilment

        elif status == fulfilment_res.FULFILMENT_STATUS_PACKED:
            step, wanted = "ShipFulfilment", fulfilment_res.FULFILMENT_STATUS_SHIPPED

            async def call() -> fulfilment_res.Fulfilment:
                return (
                    await fulfilment.ShipFulfilment(
                        fulfilment_pb.ShipFulfilmentRequest(
                            request_id=f"ship-{task_id}",
                            fulfilment_id=task_id,
                            carrier="postnl",
                            tracking_number=f"3S{task_id[:8].upper()}",
                        ),
                        timeout=CALL_TIMEOUT,
                    )
                ).fulfilment

        else:
            run.unexpected_error(
                f"task {task_id}",
                f"listed as {fulfilment_res.FulfilmentStatus.Name(status)}, not a step to work",
            )
            return
        answer = await until_acknowledged(run, f"{step} {task_id}", call, stopped)
        if answer is None:
            return
        if answer.status != wanted:
            run.unexpected_error(
                f"{step} {task_id}",
                f"left the task {fulfilment_res.FulfilmentStatus.Name(answer.status)}",
            )
            return
        status = answer.status
        if status == fulfilment_res.FULFILMENT_STATUS_SHIPPED:
            units: Counter[str] = Counter()
            for item in answer.items:
                units[item.sku] += item.picked_quantity
            if task_id in run.shipments and run.shipments[task_id].units != units:
                run.unexpected_error(f"task {task_id}", "shipped twice with other units")
            run.shipments.setdefault(
                task_id, Shipment(task_id, answer.order_id, answer.location_id, units, run.phase)
            )
            return


# -- the faults ------------------------------------------------------------------------


async def crash_each_process(run: Run) -> None:
    """SIGKILL each service in turn, then nats-server; restart each after a while."""
    stack = run.stack
    await asyncio.sleep(LOAD_BEFORE_FIRST_FAULT)
    for name in SERVICES:
        run.enter(f"{name} killed")
        await stack.kill(name)
        await asyncio.sleep(DOWN_FOR)
        run.enter(f"{name} restarting")
        await stack.restart(name)
        run.enter(f"after {name} restart")
        await asyncio.sleep(LOAD_AFTER_RESTART)
    run.enter("nats-server killed")
    await stack.kill_nats()
    await asyncio.sleep(DOWN_FOR)
    run.enter("nats-server restarting")
    await stack.restart_nats()
    await stack.wait_serving()
    run.enter("after nats-server restart")
    await asyncio.sleep(LOAD_AFTER_RESTART)


async def settle_orders(run: Run) -> dict[str, str]:
    """Wait until no order of the channel is still being routed or worked on; the
    status of every order routing keeps."""
    pool = await run.stack.pool()
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        rows = await pool.fetch(
            "SELECT order_id, status FROM routing.orders WHERE channel = $1", run.net.channel
        )
        statuses = {row["order_id"]: row["status"] for row in rows}
        if all(s not in ("routing", "routed") for s in statuses.values()):
            return statuses
        if time.monotonic() >= deadline:
            return statuses
        await asyncio.sleep(0.25)


# -- the checks ------------------------------------------------------------------------


async def converged(check: Callable[[], Awaitable[list[str]]], deadline: float) -> list[str]:
    """Run ``check`` until it finds nothing or ``deadline`` passes; what it found last."""
    while True:
        problems = await check()
        if not problems or time.monotonic() >= deadline:
            return problems
        await asyncio.sleep(0.5)


async def order_problems(run: Run, statuses: dict[str, str]) -> list[str]:
    """Orders lost, stuck, or shipped other than exactly once for exactly their units."""
    problems: list[str] = []
    for order_id, attempt in run.orders.items():
        if attempt.acknowledged and order_id not in statuses:
            problems.append(
                f"order {order_id} (sent in {attempt.phase!r}) was acknowledged, but routing "
                "does not know it"
            )
    for order_id, status in sorted(statuses.items()):
        if status != "fulfilled":
            sent_as = run.orders.get(order_id)
            sent = (
                f"sent in {sent_as.phase!r}, {sent_as.attempts} attempt(s), "
                f"{'acknowledged' if sent_as.acknowledged else 'never acknowledged'}"
                if sent_as
                else "never sent by this test"
            )
            problems.append(f"order {order_id} is stuck {status.upper()} ({sent})")
    shipped: dict[str, Counter[str]] = defaultdict(Counter)
    for shipment in run.shipments.values():
        shipped[shipment.order_id].update(shipment.units)
    pool = await run.stack.pool()
    rows = await pool.fetch(
        "SELECT l.order_id, l.sku, l.quantity, l.fulfilled_quantity FROM routing.order_lines l "
        "JOIN routing.orders o USING (order_id) WHERE o.channel = $1",
        run.net.channel,
    )
    ordered: dict[str, Counter[str]] = defaultdict(Counter)
    fulfilled: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        ordered[row["order_id"]][row["sku"]] += row["quantity"]
        fulfilled[row["order_id"]][row["sku"]] += row["fulfilled_quantity"]
    for order_id in sorted(set(ordered) | set(shipped)):
        if order_id not in ordered:
            problems.append(f"tasks of order {order_id}, which routing does not know, shipped")
            continue
        if statuses.get(order_id) != "fulfilled":
            continue
        if shipped[order_id] != ordered[order_id]:
            problems.append(
                f"order {order_id}: ordered {dict(ordered[order_id])}, but the stores shipped "
                f"{dict(shipped[order_id])}"
            )
        if fulfilled[order_id] != ordered[order_id]:
            problems.append(
                f"order {order_id}: ordered {dict(ordered[order_id])}, routing counts "
                f"{dict(fulfilled[order_id])} fulfilled"
            )
    return problems


async def movement_problems(run: Run) -> list[str]:
    """Scanner receipts and shipments lost or counted twice, and on-hand that does not
    follow from what the test did."""
    problems: list[str] = []
    net = run.net
    pool = await run.stack.pool()
    devices = sorted({key.device_id for key in run.keys.values()})
    rows = await pool.fetch(
        """
        SELECT m.device_id, m.device_sequence, m.kind, m.sku, m.location_id,
               count(p.ledger_sequence) AS postings, coalesce(sum(p.quantity_delta), 0) AS units
        FROM ledger.movements m LEFT JOIN ledger.postings p USING (movement_id)
        WHERE m.device_id = ANY($1::text[]) OR m.device_id LIKE $2
        GROUP BY m.movement_id
        """,
        devices,
        f"{FULFILMENT_DEVICE_PREFIX}%",
    )
    found_keys: Counter[tuple[str, int]] = Counter()
    shipped_in_ledger: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for row in rows:
        device, sequence = row["device_id"], row["device_sequence"]
        if device.startswith(FULFILMENT_DEVICE_PREFIX):
            task_id = device.removeprefix(FULFILMENT_DEVICE_PREFIX)
            if row["kind"] != "shipment":
                problems.append(f"ledger: {device}:{sequence} is a {row['kind']}, not a shipment")
            shipped_in_ledger[task_id][(row["sku"], row["location_id"])] -= row["units"]
            continue
        found_keys[(device, sequence)] += 1
        key = run.keys.get((device, sequence))
        if key is None:
            problems.append(f"ledger: a movement under {device}:{sequence}, a key never sent")
            continue
        recorded = (row["kind"], row["sku"], row["location_id"], row["postings"], row["units"])
        if recorded != ("receipt", key.sku, key.location_id, 1, key.units):
            problems.append(
                f"ledger: {device}:{sequence} recorded (kind, sku, location, postings, units) "
                f"= {recorded}, the scanner sent a receipt of {key.units} x {key.sku} at "
                f"{key.location_id}"
            )
    for (device, sequence), key in sorted(run.keys.items()):
        count = found_keys[(device, sequence)]
        if key.acknowledged and count != 1:
            problems.append(
                f"movement {device}:{sequence} (sent in {key.phase!r}) was acknowledged, "
                f"the ledger holds it {count} time(s)"
            )
        elif count > 1:
            problems.append(
                f"movement {device}:{sequence} (sent in {key.phase!r}, never acknowledged) "
                f"is in the ledger {count} times"
            )

    shipped: Counter[tuple[str, str]] = Counter()
    for task_id, shipment in sorted(run.shipments.items()):
        units = Counter({(sku, shipment.location_id): n for sku, n in shipment.units.items()})
        shipped.update(units)
        if shipped_in_ledger.get(task_id, Counter()) != units:
            problems.append(
                f"ledger: task {task_id} (order {shipment.order_id}, shipped in "
                f"{shipment.phase!r}) shipped {dict(units)}, the ledger's shipments under "
                f"{FULFILMENT_DEVICE_PREFIX}{task_id} take "
                f"{dict(shipped_in_ledger.get(task_id, Counter()))}"
            )
    for task_id in sorted(set(shipped_in_ledger) - set(run.shipments)):
        problems.append(
            f"ledger: shipments under {FULFILMENT_DEVICE_PREFIX}{task_id} "
            f"({dict(shipped_in_ledger[task_id])}), a task no store shipped"
        )

    expected: Counter[tuple[str, str]] = Counter()
    for sku in net.skus:
        for place in PLACES:
            expected[(sku, net.id(place.name))] += INITIAL_STOCK[place.name]
    for key in run.keys.values():
        if found_keys[(key.device_id, key.sequence)] or key.acknowledged:
            expected[(key.sku, key.location_id)] += key.units
    expected.subtract(shipped)
    levels = await run.stack.ledger.GetStockLevels(
        ledger_pb.GetStockLevelsRequest(
            skus=net.skus,
            location_ids=list(net.locations.values()),
            states=[types_pb2.STOCK_STATE_SELLABLE],
            include_zero=True,
        )
    )
    on_hand: Counter[tuple[str, str]] = Counter()
    for level in levels.levels:
        on_hand[(level.stock.sku, level.stock.location_id)] += level.on_hand
    for sku_location in sorted(set(expected) | set(on_hand)):
        if on_hand[sku_location] != expected[sku_location]:
            sku, location = sku_location
            problems.append(
                f"ledger: {sku} at {location} has {on_hand[sku_location]} on hand; initial "
                f"stock + receipts - shipped units give {expected[sku_location]}"
            )
    return problems


async def dead_letter_problems(run: Run) -> list[str]:
    """Events a consumer gave up on."""
    count, letters = await dead_letters(run.stack)
    if not count:
        return []
    problems = [f"{count} dead letter(s): events a consumer gave up on"]
    problems += [
        f"dead letter #{letter.sequence}: {letter.consumer} gave up on {letter.event_type} "
        f"{letter.event_id} after {letter.deliveries} deliveries: {letter.error}"
        for letter in letters
    ]
    problems += [f"consumer failure: {failure}" for failure in await consumer_failures(run.stack)]
    return problems


def _clock(moment: datetime | None) -> str:
    return f"{moment:%H:%M:%S.%f} UTC" if moment is not None else "never"


async def unmatched_departures(run: Run) -> list[str]:
    """Diagnostics when availability is off: the reservation service's departures whose
    two sides (hold consumed, ledger movement projected) do not agree, with the
    ledger's movement for each (what the reservation service should have matched)."""
    pool = await run.stack.pool()
    rows = await pool.fetch(
        """
        SELECT d.fulfilment_id, d.sku, d.location_id, d.consumed, d.departed,
               (SELECT string_agg(p.quantity_delta || ' at balance version ' || p.balance_version
                                  || ' recorded ' || p.recorded_at::time, ', ')
                FROM ledger.movements m JOIN ledger.postings p USING (movement_id)
                WHERE m.device_id = $1 || d.fulfilment_id AND p.sku = d.sku
                  AND p.location_id = d.location_id) AS ledger
        FROM reservation.departures d WHERE d.consumed <> d.departed
        ORDER BY d.location_id, d.sku
        """,
        FULFILMENT_DEVICE_PREFIX,
    )
    found = [
        f"reservation departure of task {row['fulfilment_id']}: {row['sku']} at "
        f"{row['location_id']} consumed {row['consumed']}, departed {row['departed']}; "
        f"the ledger's shipment: {row['ledger'] or 'none'}"
        for row in rows
    ]
    tasks = {f"{FULFILMENT_DEVICE_PREFIX}{row['fulfilment_id']}" for row in rows}
    if not tasks:
        return found
    # When the ledger's events for those shipments were written, published and applied.
    events = await pool.fetch(
        "SELECT o.event_id, o.envelope, o.created_at, o.published_at, i.processed_at "
        "FROM ledger.outbox o LEFT JOIN reservation.inbox i "
        "ON i.event_id = o.event_id AND i.consumer = 'reservation-ledger' "
        "WHERE o.subject = 'omni.ledger.stock.moved' ORDER BY o.id"
    )
    for event in events:
        moved = ledger_events.StockMoved()
        event_pb2.EventEnvelope.FromString(event["envelope"]).payload.Unpack(moved)
        movement = moved.movement
        if movement.key.device_id in tasks:
            postings = ", ".join(
                f"{p.quantity_delta} x {p.stock.sku} at {p.stock.location_id} (balance version "
                f"{p.balance_version})"
                for p in movement.postings
            )
            found.append(
                f"  its StockMoved {event['event_id']} ({postings}): written "
                f"{_clock(event['created_at'])}, published {_clock(event['published_at'])}, "
                f"applied by reservation-ledger {_clock(event['processed_at'])}"
            )
    return found


# -- the test --------------------------------------------------------------------------


async def setup_network(stack: ProcessStack) -> ScenarioNetwork:
    net = await ScenarioNetwork(stack).build(PLACES, skus=SKUS)
    for sku in net.skus:
        for place in PLACES:
            await net.receive(sku, place.name, INITIAL_STOCK[place.name])
    return net


async def run_load_and_faults(run: Run) -> dict[str, str]:
    """The load with the faults, then the drain; the status of every order routing keeps."""
    loaders = [
        *(asyncio.create_task(channel_worker(run, n)) for n in range(CHANNEL_WORKERS)),
        *(asyncio.create_task(scanner_worker(run, n)) for n in range(SCANNERS)),
    ]
    stores = [
        asyncio.create_task(store_worker(run, location_id))
        for location_id in run.net.locations.values()
    ]
    try:
        run.enter("warm-up")
        await crash_each_process(run)
        # No new orders or scans; those in flight are retried until answered.
        run.enter("draining")
        run.give_up_at = time.monotonic() + IN_FLIGHT_WITHIN
        run.stop_load.set()
        await asyncio.gather(*loaders)
        run.enter("settling")
        statuses = await settle_orders(run)
        run.stop_stores.set()
        await asyncio.gather(*stores)
        run.enter("checking")
        return statuses
    finally:
        for worker in (*loaders, *stores):
            worker.cancel()
        await asyncio.gather(*loaders, *stores, return_exceptions=True)


async def check_everything(run: Run, statuses: dict[str, str]) -> list[str]:
    """Every problem the checks find (none when the run kept its promises)."""
    problems = [f"unexpected error: {error}" for error in run.unexpected]
    # In-flight calls were retried for IN_FLIGHT_WITHIN seconds after the load stopped:
    # one still unanswered means a service that does not recover.
    problems += [
        f"order {order_id} sent in {a.phase!r} never acknowledged ({a.attempts} attempts)"
        for order_id, a in run.orders.items()
        if not a.acknowledged
    ]
    problems += [
        f"movement {k.device_id}:{k.sequence} sent in {k.phase!r} never acknowledged"
        for k in run.keys.values()
        if not k.acknowledged
    ]
    problems += await order_problems(run, statuses)
    # The ledger posts shipments from fulfilment's events: give it time to catch up
    # (a message a crash left unacknowledged comes again after JetStream's ack wait).
    converged_by = time.monotonic() + CONVERGE_WITHIN
    problems += await converged(lambda: movement_problems(run), converged_by)
    try:
        await assert_consistent(run.stack, within=max(1.0, converged_by - time.monotonic()))
    except AssertionError as error:
        problems.append(str(error))
        problems += await unmatched_departures(run)
    problems += await dead_letter_problems(run)
    return problems


async def test_no_movement_lost_no_order_stuck_when_each_process_is_killed_under_load(
    start_process_stack: StackStarter,
) -> None:
    async with start_process_stack({}) as stack:
        run = Run(stack, await setup_network(stack))
        try:
            async with asyncio.timeout(TEST_WITHIN):
                statuses = await run_load_and_faults(run)
                problems = await check_everything(run, statuses)
        except TimeoutError:
            raise AssertionError(
                f"the scenario did not end within {TEST_WITHIN} s\n{run.summary()}"
            ) from None
        listed = "\n  ".join(problems[:60])
        more = f"\n  ... and {len(problems) - 60} more" if len(problems) > 60 else ""
        assert not problems, f"{run.summary()}\nproblems:\n  {listed}{more}"
        print(run.summary())
