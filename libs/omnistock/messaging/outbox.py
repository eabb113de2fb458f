"""The transactional outbox: events commit with the state change they report.

Handlers call :func:`append` on the connection of their unit of work. The
:class:`OutboxRelay` publishes committed rows to JetStream in commit order with
``Nats-Msg-Id`` set to the event id, then marks them published. A crash between
publishing and marking republishes the same event ids, which JetStream drops as
duplicates within the stream's duplicate window (15 minutes), so every event
lands once.
Several relay replicas may run: a transaction-scoped advisory lock lets one of
them publish at a time, which keeps commit order.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from nats.js import JetStreamContext

from omnistock import metrics
from omnistock.db import Connection, Pool
from omnistock.logs import get_logger
from omnistock.messaging.envelope import MSG_ID_HEADER, OutgoingEvent, wrap

log = get_logger(__name__)

# What a lost or refusing database raises; the relay logs these and carries on.
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# Far below NATS's default max_payload (1 MB), so any server configuration takes it.
MAX_ENVELOPE_BYTES = 256 * 1024


async def append(
    conn: Connection, schema: str, producer: str, events: Sequence[OutgoingEvent]
) -> None:
    """Write ``events`` to ``schema``'s outbox inside the caller's transaction."""
    if not events:
        return
    envelopes = [wrap(event, producer) for event in events]
    for envelope in envelopes:
        # A row the relay can never publish would hold up every later event of the
        # schema; callers bound their fields, and this keeps the promise checked.
        if envelope.ByteSize() > MAX_ENVELOPE_BYTES:
            raise ValueError(
                f"{envelope.event_type} event of {envelope.ByteSize()} bytes exceeds "
                f"{MAX_ENVELOPE_BYTES}; bound the fields that feed it"
            )
    await conn.execute(
        f"""
        INSERT INTO {schema}.outbox (event_id, subject, envelope)
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[])
        """,
        [e.event_id for e in envelopes],
        [event.subject for event in events],
        [e.SerializeToString() for e in envelopes],
    )


class OutboxRelay:
    """Publishes one schema's outbox to JetStream; survives restarts and crashes."""

    def __init__(
        self,
        pool: Pool,
        js: JetStreamContext,
        *,
        schema: str,
        batch_size: int = 256,
        poll_interval: float = 1.0,
        retention_hours: float = 24.0,
        publish_timeout: float = 10.0,
    ) -> None:
        self._pool = pool
        self._js = js
        self._schema = schema
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._retention_hours = retention_hours
        self._publish_timeout = publish_timeout
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # One publisher per schema at a time, across all replicas.
        self._lock_key = zlib.crc32(f"omni-outbox:{schema}".encode())
        self._labels = {"service": schema}
        # Export the relay's counters from the start, at 0: a series that first
        # appears with its first error is invisible to increase() and rate(), so
        # alerts and the dashboard would miss exactly that first error.
        for counter in (
            metrics.OUTBOX_PUBLISHED,
            metrics.OUTBOX_DUPLICATES,
            metrics.OUTBOX_PUBLISH_ERRORS,
        ):
            counter.labels(**self._labels)
        self._backlog_reported_at = 0.0
        self._channel = f"omni_outbox_{schema}"

    async def run(self) -> None:
        """Relay until :meth:`stop` is called, then publish what is left once more.

        Errors are logged, counted and retried; the relay never gives up. It is
        woken by NOTIFY when a transaction with events commits and polls every
        ``poll_interval`` seconds in case a notification was missed (for example
        while its listening connection was being re-established).
        """
        listener: PoolConnectionProxy[asyncpg.Record] | None = None
        last_prune = 0.0
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # a NOTIFY during this cycle wakes the next one
                listener = await self._listen(listener)
                published = await self._cycle()
                if time.monotonic() - last_prune > 60:
                    await self._prune_quietly()
                    last_prune = time.monotonic()
                if published >= self._batch_size:
                    continue  # more waiting: go again without sleeping
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait(
                    {waiter, stopper},
                    timeout=self._poll_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                stopper.cancel()
            # Events committed by calls that finished during shutdown.
            while await self._cycle() >= self._batch_size:
                pass
        finally:
            if listener is not None:
                await self._release(listener)

    async def _listen(
        self, listener: PoolConnectionProxy[asyncpg.Record] | None
    ) -> PoolConnectionProxy[asyncpg.Record] | None:
        # (Re)establish the LISTEN connection; without it the relay still polls.
        if listener is not None and _usable(listener):
            return listener
        if listener is not None:
            await self._release(listener)
        try:
            connection = await self._pool.acquire()
        except _DATABASE_ERRORS as error:
            log.warning("outbox.listen_failed", schema=self._schema, error=repr(error))
            return None
        try:
            await connection.add_listener(self._channel, self._on_notify)
        except BaseException as error:
            # A standby refuses LISTEN, or we are being cancelled: give the slot back.
            await self._release(connection)
            if not isinstance(error, _DATABASE_ERRORS):
                raise
            log.warning("outbox.listen_failed", schema=self._schema, error=repr(error))
            return None
        return connection

    async def _release(self, connection: PoolConnectionProxy[asyncpg.Record]) -> None:
        try:
            if _usable(connection):
                await connection.remove_listener(self._channel, self._on_notify)
            await self._pool.release(connection)
        except _DATABASE_ERRORS as error:
            log.warning("outbox.release_failed", schema=self._schema, error=repr(error))

    async def _cycle(self) -> int:
        try:
            return await self.relay_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.OUTBOX_PUBLISH_ERRORS.labels(**self._labels).inc()
            log.exception("outbox.relay_failed", schema=self._schema)
            return 0

    async def _prune_quietly(self) -> None:
        try:
            await self.prune()
        except _DATABASE_ERRORS as error:
            log.warning("outbox.maintenance_failed", schema=self._schema, error=repr(error))

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current cycle."""
        self._stopping.set()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch of unpublished events; returns how many were published."""
        started = time.perf_counter()
        async with self._pool.acquire() as conn, conn.transaction():
            # Losing a "published" mark in a database crash is harmless: the relay
            # publishes the event again and JetStream drops it as a duplicate. So
            # this commit need not wait for its WAL flush (one fsync per cycle saved).
            await conn.execute("SET LOCAL synchronous_commit TO OFF")
            # One publisher per schema at a time keeps commit order across replicas.
            publisher = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._lock_key)
            rows: list[asyncpg.Record] = []
            if publisher:
                rows = await conn.fetch(
                    f"""
                    SELECT id, event_id, subject, envelope, created_at
                    FROM {self._schema}.outbox
                    WHERE published_at IS NULL
                    ORDER BY id
                    LIMIT $1
                    """,
                    self._batch_size,
                )
            if rows:
                await self._publish(rows)
                await conn.execute(
                    f"UPDATE {self._schema}.outbox SET published_at = clock_timestamp() "
                    "WHERE id = ANY($1::bigint[])",
                    [row["id"] for row in rows],
                )
            # Every replica reports the backlog (not only the publisher), so the gauge
            # is fresh wherever it is scraped; counting costs a query, so at most
            # once a second while busy.
            if not rows or time.monotonic() - self._backlog_reported_at > 1.0:
                await self._report_backlog(conn)
                self._backlog_reported_at = time.monotonic()
        if rows:
            now = datetime.now(UTC)
            lag = metrics.OUTBOX_PUBLISH_LAG.labels(**self._labels)
            for row in rows:
                lag.observe(max(0.0, (now - row["created_at"]).total_seconds()))
            metrics.OUTBOX_PUBLISHED.labels(**self._labels).inc(len(rows))
            metrics.OUTBOX_CYCLE_SECONDS.labels(**self._labels).observe(
                time.perf_counter() - started
            )
        return len(rows)

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> None:
        # publish_async sends in order on one connection and returns ack futures,
        # so a batch costs one round trip instead of one per event.
        acks = []
        for row in rows:
            headers = {MSG_ID_HEADER: str(row["event_id"])}
            acks.append(
                await self._js.publish_async(
                    row["subject"], bytes(row["envelope"]), headers=headers
                )
            )
        results = await asyncio.wait_for(asyncio.gather(*acks), timeout=self._publish_timeout)
        duplicates = sum(1 for ack in results if ack.duplicate)
        if duplicates:
            metrics.OUTBOX_DUPLICATES.labels(**self._labels).inc(duplicates)

    async def _report_backlog(self, conn: Connection) -> None:
        row = await conn.fetchrow(
            f"""
            SELECT count(*) AS backlog,
                   coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0) AS age
            FROM {self._schema}.outbox WHERE published_at IS NULL
            """
        )
        assert row is not None
        metrics.OUTBOX_BACKLOG.labels(**self._labels).set(row["backlog"])
        metrics.OUTBOX_OLDEST_AGE.labels(**self._labels).set(float(row["age"]))

    async def prune(self) -> int:
        """Delete events published longer ago than the retention period."""
        result: str = await self._pool.execute(
            f"DELETE FROM {self._schema}.outbox "
            "WHERE published_at < clock_timestamp() - make_interval(secs => $1)",
            self._retention_hours * 3600,
        )
        return int(result.split()[-1])


def _usable(connection: PoolConnectionProxy[asyncpg.Record]) -> bool:
    # When the server drops a pooled connection, asyncpg returns it to the pool and
    # detaches the proxy, whose every method then raises InterfaceError.
    try:
        return not connection.is_closed()
    except asyncpg.InterfaceError:
        return False
