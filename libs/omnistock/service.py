"""The lifecycle every Omnistock service shares.

Start: pool → NATS → outbox relay and workers (consumers, sweepers, batchers)
→ gRPC (health SERVING) → metrics.
Stop (SIGTERM/SIGINT): health NOT_SERVING → gRPC stops with grace, draining
in-flight calls → workers and relay stop → NATS drains → pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message
from nats.aio.client import Client
from nats.js import JetStreamContext

from omnistock.db import Pool, create_pool
from omnistock.grpc.client import ChannelFactory
from omnistock.grpc.server import (
    GrpcServer,
    ServiceBinding,
    server_credentials,
    start_grpc_server,
    token_verifier,
)
from omnistock.logs import configure_logging, get_logger
from omnistock.messaging.consumer import EventConsumer, EventHandler
from omnistock.messaging.outbox import OutboxRelay
from omnistock.metrics import MetricsEndpoint, serve_metrics
from omnistock.migrations import MigrationSet
from omnistock.nats_client import connect
from omnistock.settings import ServiceName, Settings

log = get_logger(__name__)


class ConfigurationError(RuntimeError):
    """The settings do not let a service start; names every problem."""

    def __init__(self, service: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {problem}" for problem in problems)
        super().__init__(f"{service} cannot start:{lines}")


@dataclass(frozen=True)
class ServiceContext:
    """What a service's wiring gets to build its servicers and consumers."""

    settings: Settings
    pool: Pool
    nats: Client
    js: JetStreamContext
    # Opens channels to the other services with TLS and the service token as configured.
    channels: ChannelFactory


def consumer(
    context: ServiceContext,
    *,
    name: str,
    stream: str,
    subjects: Sequence[str],
    schema: str,
    handlers: Mapping[type[Message], EventHandler],
) -> EventConsumer:
    """An idempotent consumer wired to the service's pool, JetStream and settings."""
    return EventConsumer(
        name=name,
        stream=stream,
        subjects=subjects,
        schema=schema,
        handlers=handlers,
        pool=context.pool,
        js=context.js,
        max_deliveries=context.settings.consumer_max_deliveries,
    )


class Worker(Protocol):
    """A background task of a service: a consumer, a sweeper, a batcher.

    ``run`` works until ``stop`` is called and then returns; workers start
    before the gRPC server and stop after it, so in-flight calls can finish.
    """

    name: str

    async def run(self) -> None:
        """Work until stopped."""

    def stop(self) -> None:
        """Ask :meth:`run` to return soon."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the runtime needs to know about one service."""

    name: ServiceName
    migrations: MigrationSet
    # Builds the servicers and the workers from one context, so both can share
    # objects (a servicer submits to a batcher that runs as a worker).
    build: Callable[[ServiceContext], tuple[Sequence[ServiceBinding], Sequence[Worker]]]

    @property
    def schema(self) -> str:
        """The service's PostgreSQL schema (same as its name)."""
        return self.migrations.schema


@dataclass
class RunningService:
    """A started service; :meth:`stop` takes it down in order."""

    spec: ServiceSpec
    context: ServiceContext
    grpc: GrpcServer
    relay: OutboxRelay
    workers: list[Worker]
    tasks: list[asyncio.Task[None]]
    metrics_endpoint: MetricsEndpoint | None

    stopping: bool = False
    _unhealthy: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    def background_task_ended(self, task: asyncio.Task[None]) -> None:
        """The relay and every worker must run until stop; if one ends early, stop serving.

        Health turns NOT_SERVING so the orchestrator restarts the process instead
        of leaving a service up whose events silently stopped flowing.
        """
        if self.stopping or task.cancelled():
            return
        log.critical(
            "service.background_task_ended",
            service=self.spec.name,
            task=task.get_name(),
            error=repr(task.exception()),
        )
        self._unhealthy = asyncio.ensure_future(self.grpc.set_not_serving())

    @property
    def grpc_port(self) -> int:
        """The port the gRPC server listens on."""
        return self.grpc.port

    async def stop(self) -> None:
        """Graceful shutdown; safe to call once."""
        self.stopping = True
        settings = self.context.settings
        await self.grpc.stop(settings.grpc_shutdown_grace_seconds, settings.grpc_drain_seconds)
        for worker in self.workers:
            worker.stop()
        self.relay.stop()
        done, pending = await asyncio.wait(self.tasks, timeout=10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception():
                log.error("service.task_failed", error=repr(task.exception()))
        with contextlib.suppress(Exception):
            await self.context.nats.drain()
        await self.context.pool.close()
        if self.metrics_endpoint:
            self.metrics_endpoint.close()
        log.info("service.stopped", service=self.spec.name)


async def start_service(
    spec: ServiceSpec,
    settings: Settings,
    *,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    serve_metrics_endpoint: bool = True,
) -> RunningService:
    """Start ``spec`` against the configured PostgreSQL and NATS.

    Raises :class:`ConfigurationError` first when the settings are not fit to
    run (production without keys, a service token, or its own secrets).
    """
    problems = settings.startup_problems(spec.name)
    if problems:
        raise ConfigurationError(spec.name, problems)
    verifier = token_verifier(settings)
    credentials = server_credentials(settings)
    channels = ChannelFactory.from_settings(settings)
    pool = await create_pool(
        settings.require_database_url(),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
    )
    client = await connect(
        settings.require_nats_url(), name=f"omnistock-{spec.name}", settings=settings
    )
    js = client.jetstream()
    context = ServiceContext(settings=settings, pool=pool, nats=client, js=js, channels=channels)

    relay = OutboxRelay(
        pool,
        js,
        schema=spec.schema,
        batch_size=settings.outbox_batch_size,
        poll_interval=settings.outbox_poll_interval_seconds,
        retention_hours=settings.outbox_retention_hours,
    )
    bindings, built_workers = spec.build(context)
    workers = list(built_workers)
    tasks = [asyncio.create_task(relay.run(), name=f"{spec.name}-outbox-relay")]
    tasks += [asyncio.create_task(w.run(), name=w.name) for w in workers]

    server = await start_grpc_server(
        bindings,
        host=settings.grpc_host,
        port=settings.grpc_port(spec.name) if grpc_port is None else grpc_port,
        verifier=verifier,
        credentials=credentials,
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    endpoint = None
    if serve_metrics_endpoint:
        endpoint = serve_metrics(
            settings.metrics_host,
            settings.metrics_port(spec.name) if metrics_port is None else metrics_port,
        )
    running = RunningService(spec, context, server, relay, workers, tasks, endpoint)
    for task in tasks:
        task.add_done_callback(running.background_task_ended)
    log.info("service.started", service=spec.name, grpc_port=server.port,
             metrics_port=endpoint.port if endpoint else None)  # fmt: skip
    return running


def run_forever(spec: ServiceSpec) -> None:
    """Entry point of ``python -m services.<ctx>``: run until SIGTERM or SIGINT."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, service=spec.name)
    try:
        import uvloop

        runner: Callable[..., None] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep stdlib fallback
        runner = asyncio.run
    try:
        runner(_serve(spec, settings))
    except ConfigurationError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(spec: ServiceSpec, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = await start_service(spec, settings)
    await stop.wait()
    log.info("service.stopping", service=spec.name)
    await service.stop()
