"""The ``omni`` command: run the whole system locally, prepare servers, audit the ledger."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from omnistock.auth.dev import DevAuth, write_private
from omnistock.auth.tokens import Role
from omnistock.bootstrap import provision_streams
from omnistock.db import create_pool
from omnistock.devstack.stack import EmbeddedStack, embedded_database_url
from omnistock.devstack.supervisor import ServiceProcess
from omnistock.grpc.client import ChannelFactory
from omnistock.logs import configure_logging
from omnistock.messaging.dead_letters import read_dead_letters, replay
from omnistock.migrations import migrate
from omnistock.nats_client import connect, redact_url
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
auth = typer.Typer(help="Tokens signed with the development key.", no_args_is_help=True)
app.add_typer(dev, name="dev")
app.add_typer(auth, name="auth")
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
        dev_auth: DevAuth | None = None
        if settings.auth_jwks_file is None:
            # The development key: made on the first run, kept in the state folder.
            dev_auth = DevAuth.ensure(
                _dev_auth_folder(settings),
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
            )
            env.update(dev_auth.env())
            settings = settings.model_copy(
                update={
                    "auth_jwks_file": dev_auth.jwks_file,
                    "service_token_file": dev_auth.service_token_file,
                }
            )
        channels = ChannelFactory.from_settings(settings)
        for spec in SERVICES:
            address = f"{settings.grpc_host}:{settings.grpc_port(spec.name)}"
            processes.append(
                ServiceProcess(spec.name, f"services.{spec.name}", address, env, channels)
            )
        for process in processes:
            process.start()
        asyncio.run(_wait_and_load(processes, settings, load_demo_data))
        if dev_auth is not None:
            _print_dev_tokens(dev_auth)
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
        summary = await _load(
            settings.grpc_target("ledger"),
            settings.grpc_target("reservation"),
            ChannelFactory.from_settings(settings),
        )
        typer.echo(
            f"demo data: {summary.locations} locations, {summary.skus} SKUs, "
            f"{summary.receipts} opening receipts ({summary.newly_recorded} newly recorded), "
            f"{summary.channels} channels"
        )


async def _load(
    ledger_address: str, reservation_address: str, channels: ChannelFactory
) -> DemoSummary:
    async with (
        channels.open(ledger_address) as ledger,
        channels.open(reservation_address) as reservation,
    ):
        return await load_demo(ledger, reservation, read_demo())


def _dev_auth_folder(settings: Settings) -> Path:
    return settings.state_dir.resolve() / "auth"


# What the printed development tokens may do: the demo's channels, and a store
# and a distribution centre of the demo network (deploy/demo/network.yaml).
DEV_TOKEN_TTL_SECONDS = 7 * 24 * 3600.0
DEV_SCANNER_LOCATIONS = ("store-utrecht", "dc-tilburg")
DEV_STORE_LOCATION = "store-utrecht"


def dev_tokens(dev_auth: DevAuth) -> dict[str, str]:
    """One development token per role, by the variable name it is printed under."""
    tokens: dict[str, str] = {}
    for channel in read_demo()["channels"]:
        name = f"OMNI_TOKEN_CHANNEL_{channel['id'].upper()}"
        tokens[name] = dev_auth.mint(
            Role.CHANNEL, channels=[channel["id"]], ttl_seconds=DEV_TOKEN_TTL_SECONDS
        )
    tokens["OMNI_TOKEN_SCANNER"] = dev_auth.mint(
        Role.SCANNER, locations=DEV_SCANNER_LOCATIONS, ttl_seconds=DEV_TOKEN_TTL_SECONDS
    )
    tokens["OMNI_TOKEN_STORE"] = dev_auth.mint(
        Role.STORE, locations=[DEV_STORE_LOCATION], ttl_seconds=DEV_TOKEN_TTL_SECONDS
    )
    tokens["OMNI_TOKEN_ADMIN"] = dev_auth.mint(Role.ADMIN, ttl_seconds=DEV_TOKEN_TTL_SECONDS)
    return tokens


def _print_dev_tokens(dev_auth: DevAuth) -> None:
    tokens = dev_tokens(dev_auth)
    script = dev_auth.folder / "tokens.env"
    lines = "".join(f"export {name}={token}\n" for name, token in tokens.items())
    write_private(script, lines.encode())
    typer.echo("\n  Development tokens (valid 7 days; `omni auth token` mints others):")
    for name, token in tokens.items():
        typer.echo(f"  {name}={token}")
    typer.echo(
        f"\n  `source {script}` and call with "
        '-H "Authorization: Bearer $OMNI_TOKEN_SCANNER" (see README)\n'
    )


def _print_endpoints(settings: Settings, database_url: str, nats_url: str) -> None:
    typer.echo("\nOmnistock is running. Ctrl-C stops it.\n")
    typer.echo(f"  {'service':<12} {'gRPC':<22} metrics")
    for spec in SERVICES:
        grpc_address = f"{settings.grpc_host}:{settings.grpc_port(spec.name)}"
        metrics = f"http://{settings.metrics_host}:{settings.metrics_port(spec.name)}/metrics"
        typer.echo(f"  {spec.name:<12} {grpc_address:<22} {metrics}")
    typer.echo(f"\n  PostgreSQL   {database_url}")
    typer.echo(f"  NATS         {redact_url(nats_url)}\n")


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
    channels = ChannelFactory.from_settings(_client_settings())
    typer.echo(f"{asyncio.run(_load(ledger_address, reservation_address, channels))}")


@demo.command("journey")
def demo_journey(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for each asynchronous effect.")
    ] = 30.0,
) -> None:
    """Play one customer's omnichannel journey against the running services, step by step.

    Needs the demo network (`make run` loads it). Exits 1 naming the step that failed.
    """
    config = JourneyConfig.from_settings(_client_settings(), timeout=timeout)
    try:
        asyncio.run(run_journey(config, typer.echo))
    except JourneyFailed as failed:
        typer.echo(f"\nThe journey failed at {failed}", err=True)
        raise typer.Exit(1) from failed


def _client_settings() -> Settings:
    """Settings for a command that calls the services: without a configured service
    token, the one a running `omni dev run` keeps in its state folder."""
    settings = Settings()
    dev_token = _dev_auth_folder(settings) / "service.token"
    if settings.service_token_file is None and dev_token.exists():
        settings = settings.model_copy(update={"service_token_file": dev_token})
    return settings


@auth.command("token")
def auth_token(
    role: Annotated[Role, typer.Option(help="The caller's role.")],
    channel: Annotated[
        list[str] | None, typer.Option(help="A channel it acts for (channel role; repeat).")
    ] = None,
    location: Annotated[
        list[str] | None,
        typer.Option(help="A location it acts at (scanner and store roles; repeat)."),
    ] = None,
    ttl: Annotated[float, typer.Option(help="Seconds until it expires.")] = 24 * 3600.0,
    subject: Annotated[str | None, typer.Option(help="Who it names (sub).")] = None,
) -> None:
    """Print a token signed with the development key of `omni dev run` (development only)."""
    settings = Settings()
    if settings.environment == "production":
        typer.echo("omni auth token mints development tokens only; use your issuer.", err=True)
        raise typer.Exit(2)
    folder = _dev_auth_folder(settings)
    try:
        dev_auth = DevAuth.load(
            folder, issuer=settings.auth_issuer, audience=settings.auth_audience
        )
    except FileNotFoundError:
        typer.echo(f"no development key in {folder}: run `omni dev run` once first", err=True)
        raise typer.Exit(1) from None
    if role is Role.CHANNEL and not channel:
        typer.echo("a channel token needs --channel", err=True)
        raise typer.Exit(2)
    if role in (Role.SCANNER, Role.STORE) and not location:
        typer.echo(f"a {role.value} token needs --location", err=True)
        raise typer.Exit(2)
    token = dev_auth.mint(
        role, subject=subject, channels=channel or [], locations=location or [], ttl_seconds=ttl
    )
    typer.echo(token)


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
