"""The one mapping of domain errors to gRPC statuses with ``google.rpc`` details.

Every error carries one ``google.rpc.ErrorInfo`` (AIP-193: an UPPER_SNAKE
``reason``, the ``omnistock.io`` domain and metadata naming the facts); bad
requests also carry a ``google.rpc.BadRequest`` listing every offending field.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from omnistock.errors import (
    ERROR_DOMAIN,
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

D = TypeVar("D", bound=Message)

# Rich details travel in trailing metadata. gRPC C-core clients may reject it
# above 8 KB (and always above 16 KB), so the details name the first problems
# within a byte budget and count the rest.
MAX_FIELD_VIOLATIONS = 50
MAX_DETAIL_BYTES = 6 * 1024
# Whatever a message or a detail quotes of the client's input, it is cut to these
# lengths: a huge quoted value would not fit in the metadata at all, and the
# client would see RESOURCE_EXHAUSTED from gRPC instead of the real error.
MAX_MESSAGE_CHARS = 512
MAX_DETAIL_CHARS = 256

_CODES: list[tuple[type[DomainError], int]] = [
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (NotFound, code_pb2.NOT_FOUND),
    (AlreadyExists, code_pb2.ALREADY_EXISTS),
    (FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (PermissionDenied, code_pb2.PERMISSION_DENIED),
    (Aborted, code_pb2.ABORTED),
    (Unauthenticated, code_pb2.UNAUTHENTICATED),
    (ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (Unavailable, code_pb2.UNAVAILABLE),
]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_status(error: DomainError) -> grpc.Status:
    """The rich gRPC status for ``error``."""
    code = next((c for cls, c in _CODES if isinstance(error, cls)), code_pb2.INTERNAL)
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=_metadata(error)
        )
    )
    details.append(info)
    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_cut(v.field, MAX_DETAIL_CHARS),
                        description=_cut(v.description, MAX_DETAIL_CHARS),
                    )
                    for v in _within_budget(error)
                ]
            )
        )
        details.append(bad_request)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(
            code=code, message=_cut(error.message, MAX_MESSAGE_CHARS), details=details
        )
    )
    return status


def _within_budget(error: InvalidArgument) -> list[FieldViolation]:
    shown: list[FieldViolation] = []
    size = len(error.message.encode())
    for violation in error.violations[:MAX_FIELD_VIOLATIONS]:
        size += min(len(violation.field.encode()), MAX_DETAIL_CHARS * 4) + 8
        size += min(len(violation.description.encode()), MAX_DETAIL_CHARS * 4)
        if shown and size > MAX_DETAIL_BYTES:
            break
        shown.append(violation)
    return shown


def _metadata(error: DomainError) -> dict[str, str]:
    metadata = {key: _cut(value, MAX_DETAIL_CHARS) for key, value in error.metadata.items()}
    if isinstance(error, InvalidArgument):
        shown = len(_within_budget(error))
        if shown < len(error.violations):
            metadata["violations_shown"] = str(shown)
    return metadata


def internal_status(message: str = "Internal error; it has been logged.") -> grpc.Status:
    """A status for an unexpected failure, without leaking internals to the caller."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message=message, details=[info])
    )
    return status


def error_info(call_error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ``ErrorInfo`` detail of a failed client call, if the server sent one."""
    return _detail(call_error, error_details_pb2.ErrorInfo)


def bad_request(call_error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest | None:
    """The ``BadRequest`` detail of a failed client call, if the server sent one."""
    return _detail(call_error, error_details_pb2.BadRequest)


def _detail(call_error: grpc.aio.AioRpcError, detail_type: type[D]) -> D | None:
    for detail in _details(call_error):
        if detail.TypeName() == detail_type.DESCRIPTOR.full_name:
            found = detail_type()
            detail.Unpack(found)
            return found
    return None


def _details(call_error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    # grpcio-status only ships a sync helper (its async one is experimental):
    # the rich status rides in the trailing metadata under grpc-status-details-bin.
    for key, value in call_error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []
