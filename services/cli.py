"""The ``omni`` command: run the whole system locally, prepare servers, audit the ledger."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Annotated

import grpc
import typer

from omnistock.bootstrap import provision_streams
from omnistock.db import create_pool
from omnistock.devstack.stack import EmbeddedStack, embedded_database_url
from omnistock.devstack.supervisor import ServiceProcess
from omnistock.logs import configure_logging
from omnistock.messaging.dead_letters import read_dead_letters, replay
from omnistock.migrations import migrate
from omnistock.nats_client import connect
from omnistock.settings import Settings
from services.demo.journey import JourneyConfig, JourneyFailed, run_journey
from services.demo.network import DemoSummary, load_demo, read_demo
from services.ledger.audit import audit
from services.registry import SERVICES, STREAMS_FILE, all_migrations, prepare_all

app = typer.Typer(help="Omnistock: real-time inventory and order routing.", no_args_is_help=True)
dev = typer.Typer(help="The local development stack.", no_args_is_help=True)
ledger = typer.Typer(help="Stock ledger operations.", no_args_is_help=True)
demo = typer.Typer(help="Demo data.", no_args_is_help=True)
dlq = typer.Typer(help="Dead letters: events a consumer gave up on.", no_args_is_help=True)
app.add_typer(dev, name="dev")
app.add_typer(ledger, name="ledger")
app.add_typer(demo, name="demo")
app.add_typer(dlq, name="dlq")


@dev.command("run")
def dev_run(
    load_demo_data: Annotated[
        bool, typer.Option("--demo/--no-demo", help="Load demo data.")
    ] = True,
) -> None:
    """Start PostgreSQL and NATS (embedded unless configured), then every service.

    Stays in the foreground; Ctrl-C stops everything cleanly. Data stays in the
    state folder, so the next run starts on the same data.
    """
    settings = Settings()
    configure_logging(settings.log_level, "console")
    stack = EmbeddedStack(
        settings.state_dir.resolve(),
        settings.dev_postgres_port,
        settings.dev_nats_port,
        settings.dev_nats_monitor_port,
    )
    try:
        stack.start(with_postgres=not settings.database_url, with_nats=not settings.nats_url)
    except (RuntimeError, TimeoutError) as error:
        typer.echo(f"cannot start the embedded servers: {error}", err=True)
        raise typer.Exit(1) from error
    database_url = settings.database_url or stack.database_url
    nats_url = settings.nats_url or stack.nats_url
    processes: list[ServiceProcess] = []
    try:
        asyncio.run(prepare_all(database_url, nats_url))
        env = {"OMNI_DATABASE_URL": database_url, "OMNI_NATS_URL": nats_url}
        for spec in SERVICES:
            address = f"{settings.grpc_host}:{settings.grpc_port(spec.name)}"
            processes.append(ServiceProcess(spec.name, f"services.{spec.name}", address, env))
        for process in processes:
            process.start()
        asyncio.run(_wait_and_load(processes, settings, load_demo_data))
        _print_endpoints(settings, database_url, nats_url)
        _wait_for_signal()
    finally:
        typer.echo("\nstopping services ...", err=True)
        for process in reversed(processes):
            process.stop()
        stack.stop()
        typer.echo("stopped.", err=True)


async def _wait_and_load(
    processes: list[ServiceProcess], settings: Settings, load_demo_data: bool
) -> None:
    for process in processes:
        await process.wait_serving()
    if load_demo_data:
        summary = await _load(settings.grpc_target("ledger"), settings.grpc_target("reservation"))
        typer.echo(
            f"demo data: {summary.locations} locations, {summary.skus} SKUs, "
            f"{summary.receipts} opening receipts ({summary.newly_recorded} newly recorded), "
            f"{summary.channels} channels"
        )


async def _load(ledger_address: str, reservation_address: str) -> DemoSummary:
    async with (
        grpc.aio.insecure_channel(ledger_address) as ledger,
        grpc.aio.insecure_channel(reservation_address) as reservation,
    ):
        return await load_demo(ledger, reservation, read_demo())


def _print_endpoints(settings: Settings, database_url: str, nats_url: str) -> None:
    typer.echo("\nOmnistock is running. Ctrl-C stops it.\n")
    typer.echo(f"  {'service':<12} {'gRPC':<22} metrics")
    for spec in SERVICES:
        grpc_address = f"{settings.grpc_host}:{settings.grpc_port(spec.name)}"
        metrics = f"http://{settings.metrics_host}:{settings.metrics_port(spec.name)}/metrics"
        typer.echo(f"  {spec.name:<12} {grpc_address:<22} {metrics}")
    typer.echo(f"\n  PostgreSQL   {database_url}")
    typer.echo(f"  NATS         {nats_url}\n")


def _wait_for_signal() -> None:
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    received = signal.sigwait(signals)
    typer.echo(f"received {signal.Signals(received).name}", err=True)


@app.command("migrate")
def migrate_command() -> None:
    """Apply the runtime's and every service's migrations to OMNI_DATABASE_URL."""
    settings = Settings()
    configure_logging(settings.log_level, "console")
    asyncio.run(migrate(settings.require_database_url(), all_migrations()))


@app.command("provision-streams")
def provision_streams_command() -> None:
    """Create or update the JetStream streams declared in deploy/nats/streams.yaml."""
    settings = Settings()
    configure_logging(settings.log_level, "console")
    asyncio.run(provision_streams(settings.require_nats_url(), STREAMS_FILE))


@demo.command("load")
def demo_load(
    ledger_address: Annotated[str, typer.Option(help="host:port of the ledger")] = (
        "127.0.0.1:50051"
    ),
    reservation_address: Annotated[
        str, typer.Option(help="host:port of the reservation service")
    ] = "127.0.0.1:50052",
) -> None:
    """Load the demo network into a running system (idempotent)."""
    typer.echo(f"{asyncio.run(_load(ledger_address, reservation_address))}")


@demo.command("journey")
def demo_journey(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for each asynchronous effect.")
    ] = 30.0,
) -> None:
    """Play one customer's omnichannel journey against the running services, step by step.

    Needs the demo network (`make run` loads it). Exits 1 naming the step that failed.
    """
    config = JourneyConfig.from_settings(Settings(), timeout=timeout)
    try:
        asyncio.run(run_journey(config, typer.echo))
    except JourneyFailed as failed:
        typer.echo(f"\nThe journey failed at {failed}", err=True)
        raise typer.Exit(1) from failed


def _nats_url(settings: Settings) -> str:
    # Without a configured NATS, talk to the one a running `omni dev run` serves.
    return settings.nats_url or f"nats://127.0.0.1:{settings.dev_nats_port}"


@dlq.command("list")
def dlq_list(
    consumer: Annotated[str | None, typer.Option(help="Only this consumer's letters.")] = None,
    last: Annotated[int, typer.Option(help="How many of the newest letters.")] = 20,
) -> None:
    """Show the newest dead letters with the consumer, subject, deliveries and error."""
    settings = Settings()

    async def run() -> None:
        client = await connect(_nats_url(settings), name="omnistock-dlq")
        try:
            letters = await read_dead_letters(client.jetstream(), consumer=consumer, last=last)
        finally:
            await client.close()
        for letter in letters:
            typer.echo(
                f"#{letter.sequence} consumer={letter.consumer} subject={letter.original_subject} "
                f"stream_seq={letter.original_stream_sequence} deliveries={letter.deliveries} "
                f"event={letter.event_type} {letter.event_id}\n    error: {letter.error}"
            )
        typer.echo(f"{len(letters)} dead letter(s)")

    asyncio.run(run())


@dlq.command("replay")
def dlq_replay(
    sequence: Annotated[int, typer.Argument(help="The dead letter's sequence (from `list`).")],
) -> None:
    """Publish a dead letter to its original subject again, once its cause is fixed."""
    settings = Settings()

    async def run() -> None:
        client = await connect(_nats_url(settings), name="omnistock-dlq")
        try:
            letter = await replay(client.jetstream(), sequence)
        finally:
            await client.close()
        typer.echo(f"replayed #{sequence} to {letter.original_subject} ({letter.event_id})")

    asyncio.run(run())


@ledger.command("audit")
def ledger_audit() -> None:
    """Prove on-hand equals the sum of movements for every (sku, location, state).

    Exits 1 and names the offending rows when it does not.
    """
    settings = Settings()
    # Without a configured database, audit the one a running `omni dev run` serves.
    database_url = settings.database_url or embedded_database_url(settings.dev_postgres_port)

    async def run() -> bool:
        pool = await create_pool(database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                report = await audit(conn)
        finally:
            await pool.close()
        for finding in report.findings:
            typer.echo(f"MISMATCH {finding}")
        verdict = "balances" if report.ok else f"does NOT balance ({len(report.findings)} rows)"
        typer.echo(
            f"ledger {verdict}: {report.balances_checked} balances, "
            f"{report.postings_checked} postings checked"
        )
        return report.ok

    sys.exit(0 if asyncio.run(run()) else 1)


if __name__ == "__main__":
    app()
