"""Typed settings, read once from ``OMNI_*`` environment variables.

Every service reads the same class; each picks its own ports from it. With no
database or NATS address configured, ``omni dev run`` and the test harness start
embedded servers and pass their addresses down through these variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ServiceName = Literal["ledger", "reservation", "routing", "fulfilment"]

# Fixed defaults so clients and dashboards can rely on them.
DEFAULT_GRPC_PORTS: dict[str, int] = {
    "ledger": 50051,
    "reservation": 50052,
    "routing": 50053,
    "fulfilment": 50054,
}
# The pickup-code key for development; production refuses to start with it.
DEV_FULFILMENT_CODE_SECRET = "development-only-pickup-code-secret"
# The services that call other services, so need a service token in production.
CALLERS: dict[str, tuple[str, ...]] = {
    "reservation": ("ledger",),
    "routing": ("reservation", "ledger"),
}

DEFAULT_METRICS_PORTS: dict[str, int] = {
    "ledger": 9101,
    "reservation": 9102,
    "routing": 9103,
    "fulfilment": 9104,
}


# Addresses only this machine can reach: the one place authentication may be off.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class Settings(BaseSettings):
    """Runtime configuration of an Omnistock process."""

    # Errors never echo the input: it holds secrets (a NATS password, keys).
    model_config = SettingsConfigDict(env_prefix="OMNI_", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "production"] = Field(
        default="development",
        description="production refuses to start without keys, service token and secrets.",
    )
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL DSN; unset means `omni dev run` starts an embedded server.",
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS URL(s), comma-separated; unset means an embedded nats-server.",
    )
    # NATS authentication (at most one way) and TLS, used by every connection
    # (omnistock.nats_client.connect); checked together in _check_nats_security.
    nats_user: str | None = Field(default=None, description="NATS user (with a password).")
    nats_password: SecretStr | None = Field(
        default=None, description="Password of OMNI_NATS_USER; never logged."
    )
    nats_creds_file: Path | None = Field(
        default=None, description="A NATS .creds file (user JWT and NKey seed)."
    )
    nats_nkey_seed_file: Path | None = Field(
        default=None, description="A file holding an NKey user seed (plain NKey auth)."
    )
    nats_tls_ca_file: Path | None = Field(
        default=None,
        description="CA bundle that signed the NATS server certificate; unset: system CAs.",
    )
    nats_tls_cert_file: Path | None = Field(
        default=None, description="Client certificate for NATS mutual TLS (with the key)."
    )
    nats_tls_key_file: Path | None = Field(
        default=None, description="Private key of OMNI_NATS_TLS_CERT_FILE."
    )

    @field_validator(
        "nats_user",
        "nats_password",
        "nats_creds_file",
        "nats_nkey_seed_file",
        "nats_tls_ca_file",
        "nats_tls_cert_file",
        "nats_tls_key_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose files and manifests often set a variable to "" to mean "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_nats_security(self) -> Settings:
        problems = nats_security_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    state_dir: Path = Field(
        default=Path(".omni"),
        description="Where the embedded dev stack keeps its data and logs.",
    )
    dev_postgres_port: int = 55432
    dev_nats_port: int = 4222
    dev_nats_monitor_port: int = 8222

    grpc_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    ledger_grpc_port: int = DEFAULT_GRPC_PORTS["ledger"]
    reservation_grpc_port: int = DEFAULT_GRPC_PORTS["reservation"]
    routing_grpc_port: int = DEFAULT_GRPC_PORTS["routing"]
    fulfilment_grpc_port: int = DEFAULT_GRPC_PORTS["fulfilment"]
    ledger_metrics_port: int = DEFAULT_METRICS_PORTS["ledger"]
    reservation_metrics_port: int = DEFAULT_METRICS_PORTS["reservation"]
    routing_metrics_port: int = DEFAULT_METRICS_PORTS["routing"]
    fulfilment_metrics_port: int = DEFAULT_METRICS_PORTS["fulfilment"]

    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    grpc_shutdown_grace_seconds: float = 10.0
    # Seconds between turning health NOT_SERVING and refusing calls, so load
    # balancers stop routing first (5 in Kubernetes; 0 locally).
    grpc_drain_seconds: float = 0.0
    # The largest message a gRPC server takes or sends, in bytes; a bigger
    # request is refused with RESOURCE_EXHAUSTED before any handler runs.
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    outbox_poll_interval_seconds: float = 1.0
    outbox_batch_size: int = 256
    outbox_retention_hours: float = 24.0
    consumer_max_deliveries: int = 5
    # Where services call each other; unset means grpc_host and the service's port.
    ledger_target: str | None = None
    reservation_target: str | None = None

    # Reservation: sweeper cadence, how long a departure (shipment, transfer out)
    # may leave holds uncovered before they are marked short, and how long a
    # WatchAvailability reader may leave an update unread before it is dropped.
    reservation_sweep_interval_seconds: float = 1.0
    reservation_short_grace_seconds: float = 60.0
    reservation_batch_max: int = 128
    reservation_batch_concurrency: int = 2
    watch_max_lag_seconds: float = 10.0
    # Routing: how often the routing worker looks for orders to (re)route (an
    # interrupted routing, units a source failed).
    routing_work_interval_seconds: float = 0.5
    # Fulfilment: how long a location has to accept a task before it is routed
    # elsewhere, how long a pickup waits for the customer, how often the
    # sweepers look, and the key pickup codes are hashed with (set it in
    # production; the default is for development only).
    fulfilment_accept_within_seconds: float = 1800.0
    fulfilment_pickup_window_days: float = 7.0
    fulfilment_sweep_interval_seconds: float = 1.0
    fulfilment_code_secret: str = DEV_FULFILMENT_CODE_SECRET

    # Authentication: the public keys (JWKS, with a kid per key) tokens are
    # verified with, the issuer and audience they must name, and the token this
    # process presents when it calls another service. Without a JWKS in
    # development, calls are not authenticated (a warning is logged).
    # Run without tokens on a non-loopback address (a trusted network: the compose
    # demo). Never in production, which needs the JWKS anyway.
    auth_disabled: bool = False
    auth_jwks_file: Path | None = None
    auth_issuer: str = "omnistock"
    auth_audience: str = "omnistock"
    service_token_file: Path | None = None
    # TLS: the server's certificate and key (also presented as the client
    # certificate when this process calls others), the CA that clients trust and
    # that client certificates are verified against, and whether the server
    # requires a client certificate (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_client_auth: Literal["none", "require"] = "none"
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    def grpc_port(self, service: ServiceName) -> int:
        """The gRPC port of ``service``."""
        port: int = getattr(self, f"{service}_grpc_port")
        return port

    def grpc_target(self, service: ServiceName) -> str:
        """The address other services call ``service`` at."""
        configured: str | None = getattr(self, f"{service}_target", None)
        return configured or f"{self.grpc_host}:{self.grpc_port(service)}"

    def metrics_port(self, service: ServiceName) -> int:
        """The Prometheus metrics port of ``service``."""
        port: int = getattr(self, f"{service}_metrics_port")
        return port

    def require_database_url(self) -> str:
        """The database DSN, or a clear error when none is configured."""
        if not self.database_url:
            raise RuntimeError(
                "OMNI_DATABASE_URL is not set (use `omni dev run` for a local stack)"
            )
        return self.database_url

    def service_token(self) -> str | None:
        """The token this process presents to other services, if one is configured."""
        if self.service_token_file is None:
            return None
        return self.service_token_file.read_text().strip() or None

    def startup_problems(self, service: ServiceName) -> list[str]:
        """What keeps ``service`` from starting with these settings (production only
        refuses; development runs with development defaults)."""
        problems = []
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("OMNI_TLS_CERT_FILE and OMNI_TLS_KEY_FILE must be set together")
        if self.tls_client_auth == "require" and (
            self.tls_ca_file is None or self.tls_cert_file is None
        ):
            problems.append(
                "OMNI_TLS_CLIENT_AUTH=require needs OMNI_TLS_CERT_FILE, OMNI_TLS_KEY_FILE "
                "and OMNI_TLS_CA_FILE (the CA client certificates are checked against)"
            )
        open_to_all = self.auth_jwks_file is None and self.grpc_host not in LOOPBACK_HOSTS
        if open_to_all and not self.auth_disabled:
            # Development without keys is open to every caller: only on this machine,
            # unless the operator says so for a network they trust.
            problems.append(
                f"OMNI_AUTH_JWKS_FILE is not set and the services listen on {self.grpc_host}: "
                "without keys authentication is off, which is allowed on a loopback "
                "address only (set the JWKS, or OMNI_GRPC_HOST=127.0.0.1, or "
                "OMNI_AUTH_DISABLED=true on a network only you can reach)"
            )
        if self.environment != "production":
            return problems
        if self.auth_jwks_file is None:
            problems.append(
                "OMNI_AUTH_JWKS_FILE is not set: production needs the public keys "
                "(a JWKS) that callers' tokens are verified with"
            )
        if service == "fulfilment" and self.fulfilment_code_secret == DEV_FULFILMENT_CODE_SECRET:
            problems.append(
                "OMNI_FULFILMENT_CODE_SECRET is the development default: set a secret "
                "of your own (and keep it: pickup codes already handed out depend on it)"
            )
        if CALLERS.get(service) and self.service_token_file is None:
            problems.append(
                f"OMNI_SERVICE_TOKEN_FILE is not set: {service} calls "
                f"{' and '.join(CALLERS[service])} and must present a service token"
            )
        return problems

    def require_nats_url(self) -> str:
        """The NATS URL, or a clear error when none is configured."""
        if not self.nats_url:
            raise RuntimeError("OMNI_NATS_URL is not set (use `omni dev run` for a local stack)")
        return self.nats_url


def nats_security_problems(settings: Settings) -> list[str]:
    """Each wrong combination of the NATS authentication and TLS settings, in words.

    Pure: it looks at the values only. Whether the named files exist is checked
    when connecting (omnistock.nats_client), so settings validate anywhere.
    """
    problems: list[str] = []
    user, password = settings.nats_user, settings.nats_password
    if password is not None and user is None:
        problems.append("OMNI_NATS_PASSWORD is set without OMNI_NATS_USER: set both or neither")
    if user is not None and password is None:
        problems.append("OMNI_NATS_USER is set without OMNI_NATS_PASSWORD: set both or neither")
    ways = [
        name
        for name, configured in (
            ("OMNI_NATS_USER/OMNI_NATS_PASSWORD", user is not None or password is not None),
            ("OMNI_NATS_CREDS_FILE", settings.nats_creds_file is not None),
            ("OMNI_NATS_NKEY_SEED_FILE", settings.nats_nkey_seed_file is not None),
        )
        if configured
    ]
    if len(ways) > 1:
        problems.append(
            f"NATS authentication is configured in more than one way ({', '.join(ways)}): "
            "choose one"
        )
    if ways and _url_has_credentials(settings.nats_url):
        problems.append(
            f"OMNI_NATS_URL carries credentials and {ways[0]} is set too: "
            "configure NATS credentials in one place"
        )
    if settings.nats_tls_cert_file is not None and settings.nats_tls_key_file is None:
        problems.append(
            "OMNI_NATS_TLS_CERT_FILE is set without OMNI_NATS_TLS_KEY_FILE: "
            "a client certificate needs its private key"
        )
    if settings.nats_tls_key_file is not None and settings.nats_tls_cert_file is None:
        problems.append(
            "OMNI_NATS_TLS_KEY_FILE is set without OMNI_NATS_TLS_CERT_FILE: "
            "a private key needs its client certificate"
        )
    return problems


def _url_has_credentials(urls: str | None) -> bool:
    return any(
        "@" in urlsplit(url.strip()).netloc for url in (urls or "").split(",") if url.strip()
    )
