"""The idempotent event consumer: a durable JetStream pull consumer with an inbox.

For every message the consumer opens one transaction, records the event id in
the service's ``inbox`` table and applies the handler's effect; it acknowledges
only after that transaction committed. A redelivered or duplicated event finds
its id in the inbox and changes nothing. A message that keeps failing is retried
with back-off a bounded number of times and then moved to the dead-letter stream
(``omni.dlq.<consumer>``) with the error, never silently dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2
from omnistock import metrics
from omnistock.db import Connection, Pool, unit_of_work
from omnistock.errors import Aborted
from omnistock.logs import correlation_scope, get_logger
from omnistock.messaging.envelope import MSG_ID_HEADER, occurred_at

log = get_logger(__name__)

EventHandler = Callable[[Connection, event_pb2.EventEnvelope, Any], Awaitable[None]]
# The outcomes omni_consumer_messages_total counts.
OUTCOMES = ("processed", "duplicate", "ignored", "retried", "dead_lettered")
DLQ_SUBJECT_PREFIX = "omni.dlq"


# Failures of the infrastructure, not of the message: a database failover or a
# lost connection must not send good events to the dead-letter stream.
# Deliberately narrow: a handler's own bug (a timeout it sets, a misused
# connection) must reach the dead-letter stream, not be retried for ever.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a primary that was just demoted
    Aborted,
)


def _backoff(deliveries: int) -> float:
    """Seconds before the next delivery: 0.5, 1, 2, 4 ... at most 30."""
    return float(min(30.0, 0.5 * 2 ** min(deliveries - 1, 6)))


class PoisonMessage(Exception):
    """A message that can never be handled (undecodable, no event id)."""


def _decode(message: Msg) -> event_pb2.EventEnvelope:
    try:
        envelope = event_pb2.EventEnvelope.FromString(message.data)
    except DecodeError as exc:
        raise PoisonMessage(f"not an EventEnvelope: {exc}") from exc
    if not envelope.event_id:
        raise PoisonMessage("the envelope has no event_id")
    return envelope


class EventConsumer:
    """Applies events from one stream to one service's state, exactly once in effect."""

    def __init__(
        self,
        *,
        name: str,
        stream: str,
        subjects: Sequence[str],
        schema: str,
        handlers: Mapping[type[Message], EventHandler],
        pool: Pool,
        js: JetStreamContext,
        max_deliveries: int = 5,
        batch_size: int = 64,
        ack_wait_seconds: float = 30.0,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.name = name
        self._stream = stream
        self._subjects = list(subjects)
        self._schema = schema
        self._handlers = {cls.DESCRIPTOR.full_name: (cls, fn) for cls, fn in handlers.items()}
        self._pool = pool
        self._js = js
        self._max_deliveries = max_deliveries
        self._batch_size = batch_size
        self._ack_wait = ack_wait_seconds
        self._fetch_timeout = fetch_timeout
        self._stopping = asyncio.Event()
        # Export every counter of this consumer from the start, at 0: a series that
        # first appears with its first dead letter or redelivery is invisible to
        # increase() and rate(), so alerts and the dashboard would miss it.
        for counter in (
            metrics.CONSUMER_REDELIVERIES,
            metrics.CONSUMER_DEAD_LETTERS,
            metrics.CONSUMER_ERRORS,
        ):
            counter.labels(consumer=name)
        for outcome in OUTCOMES:
            metrics.CONSUMER_MESSAGES.labels(consumer=name, outcome=outcome)

    async def ensure(self) -> None:
        """Create or update the durable consumer on the stream."""
        config = ConsumerConfig(
            durable_name=self.name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subjects=self._subjects,
            ack_wait=self._ack_wait,
            # We count attempts ourselves and dead-letter; the server must not drop.
            max_deliver=-1,
            max_ack_pending=max(1000, self._batch_size * 4),
        )
        await self._js.add_consumer(self._stream, config=config)

    async def run(self) -> None:
        """Fetch and handle messages until :meth:`stop` is called."""
        await self.ensure()
        subscription = await self._js.pull_subscribe_bind(durable=self.name, stream=self._stream)
        try:
            while not self._stopping.is_set():
                try:
                    messages = await subscription.fetch(
                        self._batch_size, timeout=self._fetch_timeout
                    )
                except TimeoutError:
                    # Nothing to do. nats-py raises either its own TimeoutError or
                    # asyncio's, which on Python 3.11 is the builtin caught here.
                    continue
                except nats.errors.Error as error:
                    # A NATS hiccup (reconnecting, server restart): wait and fetch again.
                    metrics.CONSUMER_ERRORS.labels(consumer=self.name).inc()
                    log.warning("consumer.fetch_failed", consumer=self.name, error=repr(error))
                    await asyncio.sleep(1.0)
                    continue
                for message in messages:
                    try:
                        await self.handle(message)
                    except (nats.errors.Error, OSError, TimeoutError) as error:
                        # Acknowledging or dead-lettering failed: the message stays
                        # unacknowledged and JetStream delivers it again after ack_wait.
                        metrics.CONSUMER_ERRORS.labels(consumer=self.name).inc()
                        log.warning("consumer.ack_failed", consumer=self.name, error=repr(error))
        finally:
            await subscription.unsubscribe()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand."""
        self._stopping.set()

    async def handle(self, message: Msg) -> None:
        """Handle one message: apply once, ack after commit, retry or dead-letter on error."""
        meta = message.metadata
        deliveries = meta.num_delivered
        labels = {"consumer": self.name}
        metrics.CONSUMER_PENDING.labels(**labels).set(meta.num_pending)
        if deliveries > 1:
            metrics.CONSUMER_REDELIVERIES.labels(**labels).inc()
        started = time.perf_counter()
        try:
            envelope = _decode(message)
        except PoisonMessage as exc:
            await self._dead_letter(message, exc, failures=0)
            return
        # Everything done for this event (its effect, the events that effect
        # appends to the outbox, the log lines of the handler, of a retry or a
        # dead letter, and the line below) carries the event's correlation id:
        # that is how one order is followed through every service's logs.
        with correlation_scope(envelope.correlation_id or None, envelope.event_id):
            outcome = await self._handle_envelope(message, envelope, deliveries)
            if outcome is None:
                return
            metrics.CONSUMER_HANDLING_SECONDS.labels(**labels).observe(
                time.perf_counter() - started
            )
            metrics.CONSUMER_MESSAGES.labels(consumer=self.name, outcome=outcome).inc()
            if outcome != "ignored":  # not logged: most consumers skip most event types
                log.info(
                    "consumer.handled",
                    consumer=self.name,
                    event_type=envelope.event_type,
                    event_id=envelope.event_id,
                    outcome=outcome,
                )

    async def _handle_envelope(
        self, message: Msg, envelope: event_pb2.EventEnvelope, deliveries: int
    ) -> str | None:
        """Apply the event and ack it; returns the outcome, or None when the message was
        retried or dead-lettered instead."""
        try:
            outcome = await self._apply(envelope)
        except PoisonMessage as exc:
            await self._dead_letter(message, exc, failures=0)
            return None
        except TRANSIENT_ERRORS as exc:
            await self._retry_later(message, exc, deliveries)
            return None
        except Exception as exc:
            try:
                failures = await self._count_failure(envelope.event_id, exc)
            except TRANSIENT_ERRORS as unreachable:
                await self._retry_later(message, unreachable, deliveries)
                return None
            if failures >= self._max_deliveries:
                await self._dead_letter(message, exc, failures=failures)
                return None
            log.warning("consumer.retry", consumer=self.name, failures=failures, error=repr(exc))
            await message.nak(delay=_backoff(failures))
            metrics.CONSUMER_MESSAGES.labels(consumer=self.name, outcome="retried").inc()
            return None
        await message.ack_sync()
        return outcome

    async def _retry_later(self, message: Msg, error: BaseException, deliveries: int) -> None:
        # The infrastructure failed, not the message: retried for as long as it
        # takes, never counted towards the dead-letter limit.
        log.warning(
            "consumer.transient", consumer=self.name, deliveries=deliveries, error=repr(error)
        )
        await message.nak(delay=_backoff(deliveries))
        metrics.CONSUMER_MESSAGES.labels(consumer=self.name, outcome="retried").inc()

    async def _count_failure(self, event_id: str, error: Exception) -> int:
        """Record one more failed attempt of the handler on ``event_id``; returns the count."""
        failures: int = await self._pool.fetchval(
            f"""
            INSERT INTO {self._schema}.consumer_failures AS f
                (consumer, event_id, failures, last_error)
            VALUES ($1, $2, 1, $3)
            ON CONFLICT (consumer, event_id) DO UPDATE
            SET failures = f.failures + 1, last_error = excluded.last_error, updated_at = now()
            RETURNING failures
            """,
            self.name,
            event_id,
            repr(error)[:1000],
        )
        return failures

    async def _apply(self, envelope: event_pb2.EventEnvelope) -> str:
        registered = self._handlers.get(envelope.event_type)
        if registered is None:
            return "ignored"  # an event type this consumer does not act on
        message_type, handler = registered
        payload = message_type()
        if not envelope.payload.Unpack(payload):
            raise PoisonMessage(f"payload is not a {envelope.event_type}")
        metrics.CONSUMER_EVENT_AGE.labels(consumer=self.name).observe(
            max(0.0, (datetime.now(UTC) - occurred_at(envelope)).total_seconds())
        )

        async def work(conn: Connection) -> bool:
            first_time = await conn.fetchval(
                f"INSERT INTO {self._schema}.inbox (consumer, event_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true",
                self.name,
                envelope.event_id,
            )
            if not first_time:
                return False
            await handler(conn, envelope, payload)
            return True

        applied = await unit_of_work(self._pool, work)  # in the caller's correlation scope
        return "processed" if applied else "duplicate"

    async def _dead_letter(self, message: Msg, error: Exception, *, failures: int) -> None:
        meta = message.metadata
        headers = {
            MSG_ID_HEADER: f"{self.name}:{meta.stream}:{meta.sequence.stream}",
            "Omni-Dlq-Consumer": self.name,
            "Omni-Dlq-Subject": message.subject,
            "Omni-Dlq-Stream": meta.stream,
            "Omni-Dlq-Stream-Sequence": str(meta.sequence.stream),
            "Omni-Dlq-Deliveries": str(meta.num_delivered),
            "Omni-Dlq-Failures": str(failures),
            "Omni-Dlq-Error": repr(error)[:1000],
        }
        await self._js.publish(f"{DLQ_SUBJECT_PREFIX}.{self.name}", message.data, headers=headers)
        await message.ack_sync()
        metrics.CONSUMER_DEAD_LETTERS.labels(consumer=self.name).inc()
        metrics.CONSUMER_MESSAGES.labels(consumer=self.name, outcome="dead_lettered").inc()
        log.error(
            "consumer.dead_lettered",
            consumer=self.name,
            subject=message.subject,
            stream_sequence=meta.sequence.stream,
            deliveries=meta.num_delivered,
            error=repr(error),
        )
