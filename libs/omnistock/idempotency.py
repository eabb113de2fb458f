"""Request-level idempotency (AIP-155): a retry with the same ``request_id`` gets
the first answer; the same id with a different request is ALREADY_EXISTS.

The first answer is stored in the service's ``idempotency_keys`` table in the
same transaction as the effect, so an answer exists exactly when the effect does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from omnistock.db import Connection, Pool, unit_of_work
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


async def stored_answer(
    conn: Connection, *, schema: str, method: str, request_id: str
) -> tuple[bytes, bytes] | None:
    """The (request digest, answer) kept for ``request_id``, if it was answered."""
    row = await conn.fetchrow(
        f"SELECT request_hash, response FROM {schema}.idempotency_keys "
        "WHERE method = $1 AND request_id = $2",
        method,
        request_id,
    )
    return (bytes(row["request_hash"]), bytes(row["response"])) if row else None


async def store_answer(
    conn: Connection,
    *,
    schema: str,
    method: str,
    request_id: str,
    request_digest: bytes,
    answer: bytes,
) -> None:
    """Keep the answer to ``request_id`` in the caller's transaction, with its effect.

    A concurrent first attempt that stored one already makes this a unique
    violation on IDEMPOTENCY_KEY_CONSTRAINT, which the unit of work retries.
    """
    await conn.execute(
        f"INSERT INTO {schema}.idempotency_keys (method, request_id, request_hash, response) "
        "VALUES ($1, $2, $3, $4)",
        method,
        request_id,
        request_digest,
        answer,
    )


def replayed(
    stored: tuple[bytes, bytes], request_digest: bytes, method: str, request_id: str
) -> bytes:
    """A stored answer for a retry of the same request; a different request is refused."""
    stored_digest, answer = stored
    if stored_digest != request_digest:
        raise reused(method, request_id)
    return answer


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
    key = {"schema": schema, "method": method, "request_id": request_id}
    stored = await stored_answer(conn, **key)
    if stored is not None:
        return decode(replayed(stored, request_digest, method, request_id))
    try:
        response = await execute()
    except DomainError:
        # A concurrent first attempt may have committed while this one waited for
        # its locks, and changed what this one found (the reservation it released
        # is released now). Its answer is the answer to this retry.
        stored = await stored_answer(conn, **key)
        if stored is None:
            raise
        return decode(replayed(stored, request_digest, method, request_id))
    await store_answer(conn, **key, request_digest=request_digest, answer=encode(response))
    return response


async def once_in_transaction(
    pool: Pool,
    *,
    schema: str,
    method: str,
    request_id: str,
    content: bytes,
    execute: Callable[[Connection], Awaitable[T]],
    encode: Callable[[T], bytes],
    decode: Callable[[bytes], T],
) -> T:
    """:func:`once` in a transaction of its own, retried when a concurrent first
    attempt with the same id wins (``content`` is the request's canonical content)."""

    async def work(conn: Connection) -> T:
        return await once(
            conn,
            schema=schema,
            method=method,
            request_id=request_id,
            request_digest=digest(content),
            execute=lambda: execute(conn),
            encode=encode,
            decode=decode,
        )

    return await unit_of_work(pool, work, retry_unique={IDEMPOTENCY_KEY_CONSTRAINT})


def reused(method: str, request_id: str) -> AlreadyExists:
    """The error for a request id already used for a different request."""
    return AlreadyExists(
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was already used for a different {method} request.",
        {"request_id": request_id, "method": method},
    )
