"""Domain errors shared by every service.

Pure Python on purpose: domain code raises these without knowing about gRPC.
`omnistock.grpc.errors` maps each class to one gRPC status code and attaches a
`google.rpc.ErrorInfo` (reason, metadata) and, for bad requests, a
`google.rpc.BadRequest` naming every offending field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ERROR_DOMAIN = "omnistock.io"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem with one field of a request, e.g. ``movements[3].sku``."""

    field: str
    description: str


class DomainError(Exception):
    """Base class: a request that cannot be carried out, with a reason code.

    ``reason`` is UPPER_SNAKE and stable (clients switch on it); ``message`` is a
    sentence a person understands; ``metadata`` carries the facts behind it
    (which sku, which location, asked and available quantities).
    """

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(DomainError):
    """The request itself is malformed; retrying it unchanged can never succeed."""

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        reason: str = "INVALID_REQUEST",
        message: str | None = None,
    ):
        self.violations = list(violations)
        summary = message or _summarise(self.violations)
        super().__init__(reason, summary, {"violations": str(len(self.violations))})


class NotFound(DomainError):
    """The request refers to something that does not exist."""


class AlreadyExists(DomainError):
    """An idempotency key or identifier was used before with other content."""


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state to carry it out."""


class PermissionDenied(DomainError):
    """The caller may not do this."""


class Unauthenticated(DomainError):
    """The caller presented no valid credentials."""


class Aborted(DomainError):
    """A concurrency conflict the caller may resolve by retrying."""


class Unavailable(DomainError):
    """Something the call needs is briefly out of reach; the caller may retry."""


class ResourceExhausted(DomainError):
    """The caller holds as much of a limited resource as it may (e.g. open streams)."""


def _summarise(violations: Sequence[FieldViolation]) -> str:
    if not violations:
        return "The request is invalid."
    first = violations[0]
    more = len(violations) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{first.field}: {first.description}{tail}"
