"""gRPC runtime on grpc.aio: server bootstrap, interceptors, error mapping."""

from typing import Any, TypeAlias

import grpc

# The servicer context as every servicer method and interceptor receives it.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
