"""The one way Omnistock opens a gRPC channel to a service.

:class:`ChannelFactory` applies TLS when configured (trusting
``OMNI_TLS_CA_FILE``, presenting ``OMNI_TLS_CERT_FILE``/``KEY_FILE`` as the
client certificate for mutual TLS) and attaches the bearer token to every call
through a client interceptor (call credentials would need TLS; a plaintext
development stack must carry the token too). The same interceptor passes the
current correlation id on, so a request is followed from service to service.
Services calling each other, the CLI, the demo, the dev supervisor, benchmarks
and tests all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from omnistock.logs import CORRELATION_HEADER, current_correlation_id
from omnistock.settings import Settings

ChannelOptions = Sequence[tuple[str, Any]]


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` (when there is a token) and the
    current correlation id (when one is bound) to a call's metadata."""

    def __init__(self, token: str | None) -> None:
        self._header = ("authorization", f"Bearer {token}") if token else None

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if self._header is not None and not metadata.get_all("authorization"):
            metadata.add(*self._header)
        correlation_id = current_correlation_id()
        if correlation_id and not metadata.get_all(CORRELATION_HEADER):
            metadata.add(CORRELATION_HEADER, correlation_id)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def __repr__(self) -> str:  # the token never shows in a repr or a log line
        return f"{type(self).__name__}(<redacted>)"


# grpc.aio files each interceptor under the first call kind it implements, so
# each kind gets its own class.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _token_interceptors(token: str | None) -> list[Any]:
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return [kind(token) for kind in kinds]


@dataclass(frozen=True)
class ChannelFactory:
    """Opens channels with the configured TLS and bearer token.

    ``tls`` turns TLS on; ``root_certificates`` None then trusts the system's
    roots. ``certificate_chain``/``private_key`` are the client certificate.
    """

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __repr__(self) -> str:
        return (
            f"ChannelFactory(token={'<redacted>' if self.token else None}, tls={self.tls}, "
            f"client_certificate={self.certificate_chain is not None})"
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, token: str | None = None) -> ChannelFactory:
        """TLS as ``OMNI_TLS_*`` say (on when a CA or a certificate is configured) and
        the service token (``OMNI_SERVICE_TOKEN_FILE``) unless ``token`` is given."""
        return cls(
            token=token if token is not None else settings.service_token(),
            tls=settings.tls_ca_file is not None or settings.tls_cert_file is not None,
            root_certificates=_read(settings.tls_ca_file),
            certificate_chain=_read(settings.tls_cert_file),
            private_key=_read(settings.tls_key_file),
            # The servers' message size limit holds for their clients too.
            options=(
                ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            ),
        )

    def with_token(self, token: str | None) -> ChannelFactory:
        """The same TLS with another bearer token (None: send none)."""
        return replace(self, token=token)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials; None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key if self.certificate_chain else None,
            certificate_chain=self.certificate_chain,
        )

    def open(self, target: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
        """A channel to ``target`` (host:port); close it (or use ``async with``) when done."""
        interceptors = _token_interceptors(self.token)
        merged = [*self.options, *options]
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=merged, interceptors=interceptors)
        return grpc.aio.secure_channel(
            target, credentials, options=merged, interceptors=interceptors
        )


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None
