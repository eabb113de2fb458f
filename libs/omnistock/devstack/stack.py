"""The embedded servers together: PostgreSQL and nats-server under one state folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omnistock.devstack.nats import EmbeddedNats
from omnistock.devstack.ports import port_in_use
from omnistock.devstack.postgres import EmbeddedPostgres

DATABASE = "omnistock"


def embedded_database_url(port: int) -> str:
    """The DSN of the database an embedded stack on ``port`` serves."""
    return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


@dataclass
class EmbeddedStack:
    """Starts whichever of PostgreSQL and NATS is not configured externally."""

    state_dir: Path
    postgres_port: int
    nats_port: int
    nats_monitor_port: int
    durable: bool = True
    postgres: EmbeddedPostgres | None = field(default=None, init=False)
    nats: EmbeddedNats | None = field(default=None, init=False)

    def start(self, *, with_postgres: bool = True, with_nats: bool = True) -> None:
        """Start the requested servers; a port already in use is a clear error."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        wanted = []
        if with_postgres:
            wanted.append(("PostgreSQL", self.postgres_port, "OMNI_DEV_POSTGRES_PORT"))
        if with_nats:
            wanted += [
                ("nats-server", self.nats_port, "OMNI_DEV_NATS_PORT"),
                ("nats-server monitoring", self.nats_monitor_port, "OMNI_DEV_NATS_MONITOR_PORT"),
            ]
        for what, port, variable in wanted:
            if port_in_use("127.0.0.1", port):
                raise RuntimeError(
                    f"port {port} for the embedded {what} is in use; stop what holds it "
                    f"or set {variable}"
                )
        try:
            if with_postgres:
                self.postgres = EmbeddedPostgres(
                    self.state_dir / "postgres" / "data", self.postgres_port, durable=self.durable
                )
                self.postgres.start()
                self.postgres.ensure_database(DATABASE)
            if with_nats:
                self.nats = EmbeddedNats(
                    self.state_dir / "nats" / "jetstream", self.nats_port, self.nats_monitor_port
                )
                self.nats.start()
        except BaseException:
            self.stop()
            raise

    @property
    def database_url(self) -> str:
        """The DSN of the embedded database."""
        assert self.postgres is not None
        return embedded_database_url(self.postgres.port)

    @property
    def nats_url(self) -> str:
        """The URL of the embedded nats-server."""
        assert self.nats is not None
        return self.nats.url

    def stop(self) -> None:
        """Stop what was started, NATS first (services are gone by now)."""
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
