"""A typed client for the standard gRPC health check."""

from __future__ import annotations

from typing import TypeAlias

import grpc
from grpc_health.v1 import health_pb2

_Request = health_pb2.HealthCheckRequest
_Response = health_pb2.HealthCheckResponse
HealthCheck: TypeAlias = "grpc.aio.UnaryUnaryMultiCallable[_Request, _Response]"


def health_check(channel: grpc.aio.Channel) -> HealthCheck:
    """``grpc.health.v1.Health/Check`` on ``channel``.

    Built by hand because the typing stubs of grpcio-health-checking leave out
    the methods of ``HealthStub``.
    """
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=_Request.SerializeToString,
        response_deserializer=_Response.FromString,
    )
