"""Reading and re-driving dead letters (the ``OMNI_DLQ`` stream) for operators.

A dead letter keeps the original message bytes and, in headers, which consumer
gave up, the original subject and stream sequence, the number of deliveries and
the error. Replaying publishes the original bytes to the original subject again
after the cause is fixed; consumers that had already applied the event find its
id in their inbox and change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext

from omni.common.v1 import event_pb2
from omnistock.messaging.consumer import DLQ_SUBJECT_PREFIX
from omnistock.messaging.envelope import MSG_ID_HEADER

DLQ_STREAM = "OMNI_DLQ"


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message."""

    sequence: int
    consumer: str
    original_subject: str
    original_stream_sequence: str
    deliveries: str
    error: str
    event_id: str
    event_type: str
    data: bytes


async def read_dead_letters(
    js: JetStreamContext, *, consumer: str | None = None, last: int = 20
) -> list[DeadLetter]:
    """The newest ``last`` dead letters, oldest first, optionally of one consumer."""
    info = await js.stream_info(DLQ_STREAM)
    found: list[DeadLetter] = []
    sequence = info.state.last_seq
    while sequence >= max(1, info.state.first_seq) and len(found) < last:
        try:
            message = await js.get_msg(DLQ_STREAM, sequence)
        except nats.js.errors.NotFoundError:
            sequence -= 1  # removed by retention or by hand
            continue
        headers = message.headers or {}
        letter_consumer = headers.get("Omni-Dlq-Consumer", "")
        if consumer is None or letter_consumer == consumer:
            found.append(_letter(sequence, headers, message.data or b""))
        sequence -= 1
    return list(reversed(found))


async def replay(js: JetStreamContext, sequence: int) -> DeadLetter:
    """Publish dead letter ``sequence`` to its original subject once more."""
    message = await js.get_msg(DLQ_STREAM, sequence)
    letter = _letter(sequence, message.headers or {}, message.data or b"")
    if not letter.original_subject or letter.original_subject.startswith(DLQ_SUBJECT_PREFIX):
        raise ValueError(f"dead letter {sequence} has no original subject to replay to")
    await js.publish(
        letter.original_subject,
        letter.data,
        # A new message id: the original one is inside JetStream's duplicate window
        # no longer, or was never stored; the event id inside stays the same.
        headers={MSG_ID_HEADER: f"replay:{DLQ_STREAM}:{sequence}"},
    )
    return letter


def _letter(sequence: int, headers: dict[str, str], data: bytes) -> DeadLetter:
    event_id, event_type = "", ""
    try:
        envelope = event_pb2.EventEnvelope.FromString(data)
        event_id, event_type = envelope.event_id, envelope.event_type
    except Exception:
        event_type = "(not an EventEnvelope)"
    return DeadLetter(
        sequence=sequence,
        consumer=headers.get("Omni-Dlq-Consumer", ""),
        original_subject=headers.get("Omni-Dlq-Subject", ""),
        original_stream_sequence=headers.get("Omni-Dlq-Stream-Sequence", ""),
        deliveries=headers.get("Omni-Dlq-Deliveries", ""),
        error=headers.get("Omni-Dlq-Error", ""),
        event_id=event_id,
        event_type=event_type,
        data=data,
    )
