"""Request-level idempotency (AIP-155): a retry with the same ``request_id`` gets
the first answer; the same id with a different request is ALREADY_EXISTS.

The first answer is stored in the service's ``idempotency_keys`` table in the
same transaction as the effect, so an answer exists exactly when the effect does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from omnistock.db import Connection
from omnistock.errors import AlreadyExists, DomainError, FieldViolation, InvalidArgument

T = TypeVar("T")

MAX_REQUEST_ID_LENGTH = 128
# Two concurrent first attempts with one request id meet on this key; pass it
# to ``unit_of_work(retry_unique=...)`` so the loser retries and replays.
IDEMPOTENCY_KEY_CONSTRAINT = "idempotency_keys_pkey"


def digest(content: bytes) -> bytes:
    """A stable digest of a request's canonical content."""
    return hashlib.sha256(content).digest()


def require_request_id(request_id: str) -> None:
    """Reject a missing or oversized request id before anything is written."""
    if not request_id:
        raise InvalidArgument(
            [FieldViolation("request_id", "is required to make the request idempotent")]
        )
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidArgument(
            [
                FieldViolation(
                    "request_id",
                    f"must be at most {MAX_REQUEST_ID_LENGTH} printable characters",
                )
            ]
        )


async def once(
    conn: Connection,
    *,
    schema: str,
    method: str,
    request_id: str,
    request_digest: bytes,
    execute: Callable[[], Awaitable[T]],
    encode: Callable[[T], bytes],
    decode: Callable[[bytes], T],
) -> T:
    """Run ``execute`` the first time ``request_id`` is seen; replay its answer afterwards.

    Must run inside the caller's transaction. A concurrent first attempt with the
    same id makes this one fail with a unique violation, which the unit of work
    retries; the retry then finds the stored answer.
    """
    query = (
        f"SELECT request_hash, response FROM {schema}.idempotency_keys "
        "WHERE method = $1 AND request_id = $2"
    )
    row = await conn.fetchrow(query, method, request_id)
    if row is not None:
        if bytes(row["request_hash"]) != request_digest:
            raise reused(method, request_id)
        return decode(bytes(row["response"]))
    try:
        response = await execute()
    except DomainError:
        # A concurrent first attempt may have committed while this one waited for
        # its locks, and changed what this one found (the reservation it released
        # is released now). Its answer is the answer to this retry.
        row = await conn.fetchrow(query, method, request_id)
        if row is None:
            raise
        if bytes(row["request_hash"]) != request_digest:
            raise reused(method, request_id) from None
        return decode(bytes(row["response"]))
    await conn.execute(
        f"INSERT INTO {schema}.idempotency_keys (method, request_id, request_hash, response) "
        "VALUES ($1, $2, $3, $4)",
        method,
        request_id,
        request_digest,
        encode(response),
    )
    return response


def reused(method: str, request_id: str) -> AlreadyExists:
    """The error for a request id already used for a different request."""
    return AlreadyExists(
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was already used for a different {method} request.",
        {"request_id": request_id, "method": method},
    )
