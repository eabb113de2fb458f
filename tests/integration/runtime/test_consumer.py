"""The idempotent consumer: effects once per event, bounded retries, dead letters."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from omni.common.v1 import event_pb2, types_pb2
from omnistock.db import Connection, Pool
from omnistock.messaging.consumer import EventConsumer
from omnistock.messaging.dead_letters import read_dead_letters, replay
from omnistock.messaging.envelope import OutgoingEvent, wrap
from omnistock.settings import Settings


@dataclass
class Harness:
    """A throw-away schema with messaging tables and an effects table, and a stream."""

    schema: str
    stream: str
    subject: str
    pool: Pool
    js: JetStreamContext

    async def effects(self) -> list[str]:
        rows = await self.pool.fetch(f"SELECT location_id FROM {self.schema}.effects ORDER BY n")
        return [row["location_id"] for row in rows]

    async def publish(self, envelope: event_pb2.EventEnvelope, msg_id: str) -> None:
        await self.js.publish(
            self.subject, envelope.SerializeToString(), headers={"Nats-Msg-Id": msg_id}
        )

    async def publish_raw(self, data: bytes) -> None:
        await self.js.publish(self.subject, data, headers={"Nats-Msg-Id": uuid.uuid4().hex})


@pytest.fixture
async def harness(pool: Pool, js: JetStreamContext) -> AsyncIterator[Harness]:
    tag = uuid.uuid4().hex[:8]
    schema = f"consumer_{tag}"
    await pool.execute(f"CREATE SCHEMA {schema}")
    await pool.execute("SELECT omni_runtime.install_messaging($1)", schema)
    await pool.execute(
        f"CREATE TABLE {schema}.effects (n serial PRIMARY KEY, location_id text NOT NULL)"
    )
    stream = f"TEST_{tag.upper()}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"test.{tag}.>"], duplicate_window=60))
    yield Harness(schema, stream, f"test.{tag}.thing.happened", pool, js)
    await js.delete_stream(stream)


def event(location_id: str) -> event_pb2.EventEnvelope:
    # Any registered message works as a payload; a GeoPoint-free StockKey keeps it small.
    payload = types_pb2.StockKey(sku="SKU-1", location_id=location_id)
    return wrap(OutgoingEvent(subject="unused", payload=payload), producer="test")


def recorder(
    schema: str,
    fail_times: dict[str, int] | None = None,
    error: type[Exception] = RuntimeError,
) -> Callable[..., Awaitable[None]]:
    failures = dict(fail_times or {})

    async def handle(
        conn: Connection, envelope: event_pb2.EventEnvelope, payload: types_pb2.StockKey
    ) -> None:
        await conn.execute(
            f"INSERT INTO {schema}.effects (location_id) VALUES ($1)", payload.location_id
        )
        if failures.get(payload.location_id, 0) > 0:
            failures[payload.location_id] -= 1
            raise error(f"transient failure for {payload.location_id}")

    return handle


def consumer(harness: Harness, handler: Callable[..., Awaitable[None]], **kw: int) -> EventConsumer:
    return EventConsumer(
        name=f"test-{harness.schema}",
        stream=harness.stream,
        subjects=[harness.subject],
        schema=harness.schema,
        handlers={types_pb2.StockKey: handler},
        pool=harness.pool,
        js=harness.js,
        fetch_timeout=0.2,
        **kw,
    )


async def run_until(
    running: EventConsumer, condition: Callable[[], Awaitable[bool]], within: float = 20
) -> None:
    task = asyncio.create_task(running.run())
    deadline = time.monotonic() + within
    try:
        while not await condition():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.05)
    finally:
        running.stop()
        await asyncio.wait_for(task, timeout=10)


async def test_a_duplicated_event_has_its_effect_once(harness: Harness) -> None:
    first, second = event("store-a"), event("store-b")
    await harness.publish(first, "m1")
    await harness.publish(first, "m1-again")  # same event id, not de-duplicated by JetStream
    await harness.publish(second, "m2")

    async def both_seen() -> bool:
        return len(await harness.effects()) >= 2

    await run_until(consumer(harness, recorder(harness.schema)), both_seen)
    await asyncio.sleep(0.3)  # let the duplicate arrive too

    assert await harness.effects() == ["store-a", "store-b"]
    inbox = await harness.pool.fetchval(f"SELECT count(*) FROM {harness.schema}.inbox")
    assert inbox == 2


async def test_a_failing_handler_is_retried_and_its_partial_effect_rolled_back(
    harness: Harness,
) -> None:
    await harness.publish(event("store-flaky"), "m1")

    async def applied() -> bool:
        return await harness.effects() == ["store-flaky"]

    await run_until(
        consumer(harness, recorder(harness.schema, {"store-flaky": 2}), max_deliveries=5), applied
    )
    assert await harness.effects() == ["store-flaky"]


async def test_a_poison_message_is_dead_lettered_with_its_error(
    harness: Harness, js: JetStreamContext
) -> None:
    dlq_before = (await js.stream_info("OMNI_DLQ")).state.last_seq
    await harness.publish(event("store-poison"), "m1")
    await harness.publish_raw(b"\xff\xfe not a protobuf envelope")
    await harness.publish(event("store-fine"), "m3")
    name = f"test-{harness.schema}"

    async def dead_lettered_both() -> bool:
        return (await js.stream_info("OMNI_DLQ")).state.last_seq >= dlq_before + 2

    await run_until(
        consumer(harness, recorder(harness.schema, {"store-poison": 99}), max_deliveries=3),
        dead_lettered_both,
    )

    letters = [await js.get_msg("OMNI_DLQ", dlq_before + n) for n in (1, 2)]
    assert {letter.subject for letter in letters} == {f"omni.dlq.{name}"}
    headers = [letter.headers or {} for letter in letters]
    assert any("RuntimeError" in h.get("Omni-Dlq-Error", "") for h in headers)
    assert any(h.get("Omni-Dlq-Deliveries") == "3" for h in headers)
    assert any("not an EventEnvelope" in h.get("Omni-Dlq-Error", "") for h in headers)
    assert all(h.get("Omni-Dlq-Subject") == harness.subject for h in headers)
    # The poison message's effect was rolled back each time; the good one went through.
    assert await harness.effects() == ["store-fine"]


async def test_nothing_is_acked_before_commit(harness: Harness) -> None:
    """A handler that fails is not acknowledged: the event is delivered again."""
    await harness.publish(event("store-once-broken"), "m1")
    deliveries: list[int] = []
    handler = recorder(harness.schema, {"store-once-broken": 1})

    async def counting(
        conn: Connection, envelope: event_pb2.EventEnvelope, payload: types_pb2.StockKey
    ) -> None:
        deliveries.append(1)
        await handler(conn, envelope, payload)

    async def done() -> bool:
        return await harness.effects() == ["store-once-broken"]

    await run_until(consumer(harness, counting), done)
    assert len(deliveries) == 2


async def test_an_operator_can_list_and_replay_dead_letters(
    harness: Harness, js: JetStreamContext, settings: Settings
) -> None:
    name = f"test-{harness.schema}"
    await harness.publish(event("store-broken-for-now"), "m1")

    async def dead_lettered() -> bool:
        return len(await read_dead_letters(js, consumer=name)) == 1

    await run_until(
        consumer(harness, recorder(harness.schema, {"store-broken-for-now": 99}), max_deliveries=2),
        dead_lettered,
    )
    [letter] = await read_dead_letters(js, consumer=name)
    assert letter.original_subject == harness.subject
    assert letter.deliveries == "2"
    assert "transient failure" in letter.error
    assert letter.event_type == "omni.common.v1.StockKey"

    listing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "dlq", "list", "--consumer", name,
        env={**os.environ, "OMNI_NATS_URL": settings.require_nats_url()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(listing.communicate(), timeout=60)
    assert listing.returncode == 0, err.decode()
    assert f"#{letter.sequence} consumer={name}" in out.decode()
    assert "1 dead letter(s)" in out.decode()

    # The cause is fixed; replaying lets the consumer apply the event once.
    await replay(js, letter.sequence)

    async def applied() -> bool:
        return await harness.effects() == ["store-broken-for-now"]

    await run_until(consumer(harness, recorder(harness.schema)), applied)


async def test_an_infrastructure_failure_is_retried_past_max_deliveries_not_dead_lettered(
    harness: Harness, js: JetStreamContext
) -> None:
    dlq_before = (await js.stream_info("OMNI_DLQ")).state.last_seq
    await harness.publish(event("store-db-failover"), "m1")

    async def applied() -> bool:
        return await harness.effects() == ["store-db-failover"]

    # Three connection failures, although only two deliveries are allowed for bugs.
    handler = recorder(harness.schema, {"store-db-failover": 3}, error=ConnectionResetError)
    await run_until(consumer(harness, handler, max_deliveries=2), applied)

    assert (await js.stream_info("OMNI_DLQ")).state.last_seq == dlq_before
