"""Building and reading the ``omni.common.v1.EventEnvelope`` every event travels in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from omni.common.v1 import event_pb2
from omnistock.logs import current_causation_id, current_correlation_id, new_id

M = TypeVar("M", bound=Message)

MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True)
class OutgoingEvent:
    """An event a handler wants published: where to, what, and its ordering key."""

    subject: str
    payload: Message
    ordering_key: str = ""
    occurred_at: datetime | None = None
    # The correlation id of the request behind the event, when it is not the
    # current one: a group-committed batch writes the events of many requests.
    correlation_id: str | None = None


def wrap(event: OutgoingEvent, producer: str) -> event_pb2.EventEnvelope:
    """Put ``event`` in a fresh envelope carrying its (or the current) correlation context."""
    envelope = event_pb2.EventEnvelope(
        event_id=new_id(),
        event_type=event.payload.DESCRIPTOR.full_name,
        correlation_id=event.correlation_id or current_correlation_id() or "",
        causation_id=current_causation_id() or "",
        producer=producer,
        ordering_key=event.ordering_key,
    )
    envelope.occurred_at.FromDatetime(event.occurred_at or datetime.now(UTC))
    envelope.payload.Pack(event.payload)
    return envelope


def unpack(envelope: event_pb2.EventEnvelope, message_type: type[M]) -> M | None:
    """The payload as ``message_type``, or None when the envelope holds another type."""
    if envelope.payload.TypeName() != message_type.DESCRIPTOR.full_name:
        return None
    message = message_type()
    envelope.payload.Unpack(message)
    return message


def occurred_at(envelope: event_pb2.EventEnvelope) -> datetime:
    """When the event's fact became true, as an aware datetime."""
    stamp: Timestamp = envelope.occurred_at
    return stamp.ToDatetime(tzinfo=UTC)
