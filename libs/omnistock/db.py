"""PostgreSQL access through asyncpg: the pool and a retrying unit of work.

A handler does all its work for one command inside ``unit_of_work``: one
transaction, retried from the start when PostgreSQL reports a conflict that a
retry resolves (deadlock, serialization failure, or a unique key a concurrent
writer just committed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from omnistock.errors import Aborted

T = TypeVar("T")
# A connection as handlers receive it: straight or through the pool's proxy.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"

_RETRYABLE = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> Pool:
    """Open a connection pool; every connection reports its application name."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": "omnistock"},
    )
    return pool


async def unit_of_work(
    pool: Pool,
    work: Callable[[Connection], Awaitable[T]],
    *,
    attempts: int = 5,
    retry_unique: Collection[str] = (),
) -> T:
    """Run ``work`` in one transaction, retrying it whole on a transient conflict.

    ``work`` must be safe to run again from the start: everything it did in a
    failed attempt was rolled back with the transaction. ``retry_unique`` names
    the unique constraints a concurrent writer may win (an idempotency key
    posted twice at once): the retry then finds the winner's row. Any other
    unique violation is a bug and is raised as it is.
    """
    last: Exception | None = None
    for _ in range(attempts):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await work(conn)
        except _RETRYABLE as exc:
            last = exc
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name not in retry_unique:
                raise
            last = exc
    raise Aborted(
        "CONCURRENT_UPDATE",
        "The request conflicted with concurrent updates too often; retry it.",
        {"attempts": str(attempts), "cause": type(last).__name__},
    )
