"""Protobuf well-known types (Timestamp, Duration) to and from Python, once for all services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from omnistock.errors import FieldViolation, InvalidArgument

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Longer than any rule here could want; checked before converting.
_MAX_DURATION_SECONDS = 10 * 365 * 24 * 3600


def timestamp_in(stamp: Timestamp, present: bool, field: str) -> datetime | None:
    """A request's timestamp field as an aware datetime, None when unset, or INVALID_ARGUMENT."""
    if not present:
        return None
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidArgument(
            [FieldViolation(field, f"is not a valid timestamp ({error})")]
        ) from error


def to_datetime(stamp: Timestamp) -> datetime:
    """A timestamp this system wrote (an event, a stored answer) as an aware datetime."""
    return stamp.ToDatetime(tzinfo=UTC)


@lru_cache(maxsize=4096)
def timestamp_out(moment: datetime) -> Timestamp:
    """A protobuf timestamp (cached: a batch shares one time).

    Callers only copy the result into other messages, never change it.
    """
    # Exact integer arithmetic; Timestamp.FromDatetime is several times slower.
    delta = moment - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def duration_in(value: Duration, present: bool, field: str) -> timedelta | None:
    """A request's positive Duration field as a timedelta, None when unset, or INVALID_ARGUMENT."""
    if not present:
        return None
    if not 0 <= value.seconds <= _MAX_DURATION_SECONDS or value.nanos < 0:
        raise InvalidArgument(
            [FieldViolation(field, f"must be a positive duration, got {value.seconds} seconds")]
        )
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def duration_out(value: timedelta) -> Duration:
    """A timedelta as a Duration."""
    out = Duration()
    out.FromTimedelta(value)
    return out
