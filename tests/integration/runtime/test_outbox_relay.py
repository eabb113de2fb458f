"""The outbox relay publishes every committed event exactly once, through crashes.

The relay runs inside a real ledger service process, which the test SIGKILLs
while it is publishing, then starts again, twice. Every movement must appear on
JetStream exactly once: events published but not yet marked before the kill
are published again and dropped by JetStream's de-duplication (Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2
from omni.ledger.v1 import events_pb2
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import resources_pb2 as res
from omnistock.db import Connection, Pool
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.messaging.envelope import unpack
from omnistock.service import RunningService
from services.ledger import domain
from services.ledger.handlers import LedgerHandlers
from tests.conftest import LedgerStub, Network


def start_ledger_process(dsn: str, nats_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OMNI_DATABASE_URL": dsn,
        "OMNI_NATS_URL": nats_url,
        "OMNI_LEDGER_GRPC_PORT": str(free_port()),
        "OMNI_LEDGER_METRICS_PORT": str(free_port()),
        "OMNI_OUTBOX_BATCH_SIZE": "50",
        "OMNI_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "services.ledger"], env=env)


async def published_count(conn: Connection) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM ledger.outbox WHERE published_at IS NOT NULL")
    )


async def wait_until(predicate_value: int, conn: Connection, within: float) -> None:
    deadline = time.monotonic() + within
    while await published_count(conn) < predicate_value:
        assert time.monotonic() < deadline, "the relay did not publish in time"
        await asyncio.sleep(0.005)


async def test_every_movement_lands_on_jetstream_exactly_once_through_relay_kills(
    stack: EmbeddedStack, isolated_dsn: str, js: JetStreamContext
) -> None:
    start_sequence = (await js.stream_info("OMNI_LEDGER")).state.last_seq + 1
    pool = await asyncpg.create_pool(isolated_dsn, min_size=1, max_size=4)
    assert pool is not None
    handlers = LedgerHandlers(pool)
    tag = uuid.uuid4().hex[:8]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO ledger.locations (location_id, kind, name, latitude, longitude) "
            "VALUES ($1, 'store', 'Relay test', 52.1, 5.1)",
            f"loc-{tag}",
        )
        await conn.execute(
            "INSERT INTO ledger.skus (sku, product_id, name) VALUES ($1, 'P', 'Relay test')",
            f"SKU-{tag}",
        )
    # Commit 1200 movements while no relay runs: the outbox holds them all.
    total = 1200
    for start in range(0, total, 300):
        await handlers.post_movements(
            [
                domain.PostMovement(
                    key=domain.IdempotencyKey(f"relay-{tag}", n),
                    sku=f"SKU-{tag}",
                    location_id=f"loc-{tag}",
                    detail=domain.Receipt(quantity=1),
                )
                for n in range(start + 1, start + 301)
            ]
        )

    kills = 0
    async with pool.acquire() as conn:
        for target in (100, 600):
            process = start_ledger_process(isolated_dsn, stack.nats_url)
            try:
                await wait_until(target, conn, within=60)
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait()
            kills += 1
            assert await published_count(conn) < total, "killed too late to test anything"
        process = start_ledger_process(isolated_dsn, stack.nats_url)
        try:
            await wait_until(total, conn, within=60)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    await pool.close()

    seen: dict[str, int] = {}
    consumer = await js.pull_subscribe(
        "omni.ledger.stock.moved",
        stream="OMNI_LEDGER",
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_sequence
        ),
    )
    while True:
        try:
            batch = await consumer.fetch(500, timeout=1)
        except nats.errors.TimeoutError:
            break
        for message in batch:
            envelope = event_pb2.EventEnvelope.FromString(message.data)
            moved = unpack(envelope, events_pb2.StockMoved)
            assert moved is not None
            if moved.movement.sku == f"SKU-{tag}":
                seen[moved.movement.movement_id] = seen.get(moved.movement.movement_id, 0) + 1
            await message.ack()
    await consumer.unsubscribe()

    assert kills == 2
    assert len(seen) == total
    assert set(seen.values()) == {1}


async def test_the_relay_survives_losing_its_listening_connection(
    ledger_service: RunningService, ledger: LedgerStub, network: Network, pool: Pool
) -> None:
    listeners = await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'LISTEN%omni_outbox_ledger%'"
    )
    assert listeners, "the relay should be listening for commits"
    for row in listeners:
        await pool.execute("SELECT pg_terminate_backend($1)", row["pid"])
    [store] = await network.locations(1)
    [sku] = await network.skus(1)

    posted = await ledger.PostMovements(
        pb.PostMovementsRequest(
            movements=[
                res.MovementInput(
                    key=network.next_key(), sku=sku, location_id=store,
                    receipt=res.Receipt(quantity=2),
                )
            ]
        )
    )  # fmt: skip

    movement_id = posted.results[0].movement.movement_id
    deadline = time.monotonic() + 15
    while True:
        unpublished = await pool.fetchval(
            "SELECT count(*) FROM ledger.outbox WHERE published_at IS NULL"
        )
        if unpublished == 0:
            break
        assert time.monotonic() < deadline, f"event of {movement_id} not published"
        await asyncio.sleep(0.1)
    relay_task = ledger_service.tasks[0]
    assert not relay_task.done(), relay_task.exception()
    # And it listens again, so the next commit wakes it without waiting for a poll.
    deadline = time.monotonic() + 10
    while not await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'LISTEN%omni_outbox_ledger%'"
    ):
        assert time.monotonic() < deadline, "the relay did not listen again"
        await asyncio.sleep(0.1)
