"""Connecting to NATS the same way in every process.

Authentication (a user and password, a plain NKey seed, or a ``.creds`` file
with a user JWT) and TLS come from the ``OMNI_NATS_*`` settings and are applied
here, so the services, the stream provisioner, the CLI and the dev stack all
connect alike. Secrets are handed to nats-py and never logged.

A first connection that fails for a reason retrying cannot fix (credentials
refused, a certificate not trusted, a client certificate missing) raises
:class:`NatsConnectError` at once; an unreachable server is retried without
end, as before, so a service may start before NATS does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nkeys  # type: ignore[import-untyped]
from nats.aio.client import Client

from omnistock.logs import get_logger
from omnistock.settings import Settings

log = get_logger(__name__)

_CLOSE_REFUSED_SECONDS = 0.25


class NatsConnectError(RuntimeError):
    """NATS refused the first connection for a reason retrying cannot fix."""


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for, or None when no TLS file is configured.

    ``OMNI_NATS_TLS_CA_FILE`` replaces the system CAs for verifying the server;
    ``OMNI_NATS_TLS_CERT_FILE`` and ``OMNI_NATS_TLS_KEY_FILE`` add a client
    certificate (mutual TLS). The server's certificate and host name are always
    verified.
    """
    ca, cert = settings.nats_tls_ca_file, settings.nats_tls_cert_file
    key = settings.nats_tls_key_file
    if ca is None and cert is None:
        return None
    if ca is not None:
        _require_file(ca, "OMNI_NATS_TLS_CA_FILE")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
        )
    except ssl.SSLError as error:
        raise NatsConnectError(
            f"OMNI_NATS_TLS_CA_FILE ({ca}) holds no usable CA certificate: {_reason(error)}"
        ) from error
    if cert is not None and key is not None:
        _require_file(cert, "OMNI_NATS_TLS_CERT_FILE")
        _require_file(key, "OMNI_NATS_TLS_KEY_FILE")
        try:
            context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as error:
            raise NatsConnectError(
                f"cannot load the client certificate OMNI_NATS_TLS_CERT_FILE ({cert}) with "
                f"OMNI_NATS_TLS_KEY_FILE ({key}): {_reason(error)} (does the key match?)"
            ) from error
    return context


def connect_options(settings: Settings) -> dict[str, Any]:
    """The nats-py ``connect`` keyword arguments for authentication and TLS.

    Empty when nothing is configured. For a caller that needs its own
    connection options; everyone else calls :func:`connect`.
    """
    options: dict[str, Any] = {}
    if settings.nats_user is not None and settings.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    elif settings.nats_creds_file is not None:
        _require_creds_file(settings.nats_creds_file)
        options["user_credentials"] = str(settings.nats_creds_file)
    elif settings.nats_nkey_seed_file is not None:
        _require_file(settings.nats_nkey_seed_file, "OMNI_NATS_NKEY_SEED_FILE")
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    return options


def describe_credentials(settings: Settings) -> str:
    """How the settings authenticate, in words and without a secret (for logs and errors)."""
    if settings.nats_user is not None:
        return f"user {settings.nats_user!r} with OMNI_NATS_PASSWORD"
    if settings.nats_creds_file is not None:
        return f"the credentials file OMNI_NATS_CREDS_FILE ({settings.nats_creds_file})"
    if settings.nats_nkey_seed_file is not None:
        return f"the NKey seed file OMNI_NATS_NKEY_SEED_FILE ({settings.nats_nkey_seed_file})"
    return "no credentials"


async def connect(url: str, name: str, *, settings: Settings | None = None) -> Client:
    """Connect with reconnects on, connection events logged, and the configured security.

    ``settings`` defaults to the environment's (``OMNI_NATS_*``). Raises
    :class:`NatsConnectError` when the first connection is refused for a reason
    retrying cannot fix; unreachable servers are retried until they answer.
    """
    settings = settings if settings is not None else Settings()
    servers = [server.strip() for server in url.split(",") if server.strip()]
    where = ", ".join(redact_url(server) for server in servers)
    credentials = describe_credentials(settings)
    if credentials == "no credentials" and any(redact_url(s) != s for s in servers):
        credentials = "the credentials in the NATS URL"
    wants_tls = tls_wanted(settings, servers)
    options = connect_options(settings)
    client = Client()
    first_connection = True
    gave_up = False

    async def on_error(error: Exception) -> None:
        nonlocal gave_up
        if gave_up:
            return  # the connection's remains being closed; the caller has the reason
        if first_connection:
            refusal = _refusal(
                error, credentials, client._server_info, settings.nats_tls_cert_file is not None
            )
            if refusal is not None:
                gave_up = True
                # Raised out of the error callback, it ends nats-py's retry loop.
                raise NatsConnectError(f"NATS at {where} refused {name!r}: {refusal}") from error
        log.warning("nats.error", error=repr(error))

    async def on_disconnected() -> None:
        # Closing or draining on purpose also disconnects; only warn about the unplanned.
        if not (client.is_closed or client.is_draining):
            log.warning("nats.disconnected")

    async def on_reconnected() -> None:
        log.info("nats.reconnected")

    try:
        await client.connect(
            servers=servers,
            name=name,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            max_reconnect_attempts=-1,
            # Annotated int in nats-py, which only sleeps on it: half a second is meant.
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            **options,
        )
    except NatsConnectError:
        await _close_refused(client)
        raise
    except nkeys.NkeysError as error:
        await _close_refused(client)
        raise NatsConnectError(f"{credentials} does not hold a valid NKey seed: {error}") from error
    first_connection = False
    # nats-py upgrades to TLS only when the server asks for it; with TLS configured,
    # a server that did not ask is a plaintext connection nobody meant to have.
    if wants_tls and not client._server_info.get("tls_required"):
        gave_up = True
        await client.close()
        raise NatsConnectError(
            f"TLS is configured but NATS at {where} did not require TLS, so the connection "
            "would not be encrypted: enable TLS on the server (without allow_non_tls)"
        )
    log.info("nats.connected", servers=where, name=name, credentials=credentials, tls=wants_tls)
    return client


def tls_wanted(settings: Settings, servers: list[str]) -> bool:
    """True when the settings configure TLS or any server URL uses ``tls://``."""
    return (
        settings.nats_tls_ca_file is not None
        or settings.nats_tls_cert_file is not None
        or any(urlsplit(server).scheme == "tls" for server in servers)
    )


def redact_url(url: str) -> str:
    """``url`` with any user and password replaced, for logs and errors."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _refusal(
    error: Exception, credentials: str, server_info: dict[str, Any], client_certificate: bool
) -> str | None:
    """Why ``error`` on a first connection cannot be fixed by retrying, or None."""
    text = str(error).lower()
    if "authorization violation" in text or "authentication expired" in text:
        if credentials == "no credentials":
            return (
                f"it requires credentials and none are configured ({str(error).strip()}): set "
                "OMNI_NATS_USER and OMNI_NATS_PASSWORD, OMNI_NATS_CREDS_FILE or "
                "OMNI_NATS_NKEY_SEED_FILE"
            )
        return f"it did not accept {credentials} ({str(error).strip()})"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"its TLS certificate is not trusted ({error.verify_message}): set "
            "OMNI_NATS_TLS_CA_FILE to the CA that signed it"
        )
    if server_info.get("tls_verify") and not client_certificate:
        # With TLS 1.3 the server's refusal arrives after the handshake, as an
        # alert or as a reset depending on timing; its INFO already said why.
        return (
            f"it requires a client certificate and none is configured ({error!r}): set "
            "OMNI_NATS_TLS_CERT_FILE and OMNI_NATS_TLS_KEY_FILE"
        )
    if isinstance(error, ssl.SSLError) and "alert" in _reason(error).lower():
        return (
            f"it ended the TLS handshake ({_reason(error)}): does it trust the client "
            "certificate OMNI_NATS_TLS_CERT_FILE?"
        )
    return None


async def _close_refused(client: Client) -> None:
    # After a failed TLS upgrade nats-py's close waits for a stream that never
    # reports closed (nats-io/nats.py#718); the socket is closed by then, so
    # waiting a moment is enough. A client refused before it opened a socket
    # (an unreadable seed) fails nats-py's own assertion instead: nothing to close.
    with contextlib.suppress(TimeoutError, AssertionError):
        await asyncio.wait_for(client.close(), _CLOSE_REFUSED_SECONDS)


def _reason(error: ssl.SSLError) -> str:
    return str(error.reason or error)


def _require_creds_file(path: Path) -> None:
    _require_file(path, "OMNI_NATS_CREDS_FILE")
    # nats-py reads a file without the JWT section line by line forever, blocking
    # the event loop; a .creds file has both sections.
    text = path.read_text(errors="replace")
    if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
        raise NatsConnectError(
            f"OMNI_NATS_CREDS_FILE names {path}, which is not a NATS credentials file "
            "(it needs a NATS USER JWT and a USER NKEY SEED section, as `nsc` writes them)"
        )


def _require_file(path: Path, variable: str) -> None:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise NatsConnectError(f"{variable} names {path}, which is not a readable file")
