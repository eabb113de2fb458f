"""gRPC server bootstrap shared by every service.

Each server gets the standard health service, server reflection (so ``buf curl``
and ``grpcurl`` work without the protos), and the interceptors. Shutdown is
graceful: health turns NOT_SERVING first so load balancers stop sending, then
in-flight calls get ``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnistock.auth.tokens import TokenVerifier
from omnistock.grpc.auth import AuthInterceptor
from omnistock.grpc.interceptors import (
    CorrelationInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestDecodingInterceptor,
)
from omnistock.logs import get_logger
from omnistock.settings import Settings

log = get_logger(__name__)

Registrar = Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer, the generated function that registers it, and its full name."""

    full_name: str
    servicer: object
    register: Registrar


class GrpcServer:
    """A running grpc.aio server with health and reflection."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 port: int, names: Sequence[str]) -> None:  # fmt: skip
        self.server = server
        self.health = health_servicer
        self.port = port
        self._names = list(names)

    async def set_serving(self) -> None:
        """Report SERVING for the whole server and every service."""
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """Report NOT_SERVING for the whole server and every service."""
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float, drain: float = 0.0) -> None:
        """Turn health NOT_SERVING, keep serving ``drain`` seconds so load balancers
        notice, then stop accepting calls and give in-flight ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            await asyncio.sleep(drain)
        await self.server.stop(grace)
        log.info("grpc.stopped", port=self.port)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the server when a certificate is configured (None: plaintext).

    With ``OMNI_TLS_CLIENT_AUTH=require`` a client must present a certificate
    signed by ``OMNI_TLS_CA_FILE`` (mutual TLS).
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    require = settings.tls_client_auth == "require"
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None,
        require_client_auth=require,
    )


def token_verifier(settings: Settings) -> TokenVerifier | None:
    """The verifier of callers' tokens; None when no JWKS is configured (development)."""
    if settings.auth_jwks_file is None:
        return None
    return TokenVerifier(settings.auth_jwks_file, settings.auth_issuer, settings.auth_audience)


async def start_grpc_server(
    bindings: Sequence[ServiceBinding],
    *,
    host: str,
    port: int,
    verifier: TokenVerifier | None = None,
    credentials: grpc.ServerCredentials | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> GrpcServer:
    """Start a server for ``bindings`` on ``host:port`` (0 picks a free port).

    ``verifier`` checks every call's bearer token (None: authentication off);
    ``credentials`` serve TLS (None: plaintext); a message larger than
    ``max_message_bytes`` either way is RESOURCE_EXHAUSTED before any handler runs.
    """
    server = grpc.aio.server(
        interceptors=[
            MetricsInterceptor(),
            CorrelationInterceptor(),
            AuthInterceptor(verifier),
            ErrorInterceptor(),
            # Innermost, so the error mapping and the metrics see a request that
            # does not parse as INVALID_ARGUMENT (not gRPC's own UNKNOWN).
            RequestDecodingInterceptor(),
        ],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    for binding in bindings:
        binding.register(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [binding.full_name for binding in bindings]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    running = GrpcServer(server, health_servicer, bound, names)
    await running.set_serving()
    log.info("grpc.listening", host=host, port=bound, services=names,
             tls=credentials is not None, authentication=verifier is not None)  # fmt: skip
    if verifier is None:
        log.warning("grpc.authentication_off", reason="no OMNI_AUTH_JWKS_FILE (development)")
    return running
