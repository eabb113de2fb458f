"""Group commit: concurrent commands share one transaction.

A hot row (one SKU at one store during a sale) admits one writer at a time, so
one transaction per call caps throughput at the row's lock turnover. The
:class:`GroupCommitter` queues commands while a transaction is running and then
hands everything queued to the next one, so the row is locked and written once
for many calls and the commit's fsync is shared. Each command still gets its
own outcome: a result or the domain error that refused it alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from omnistock import metrics
from omnistock.logs import get_logger

C = TypeVar("C")
R = TypeVar("R")

log = get_logger(__name__)


class GroupCommitter(Generic[C, R]):
    """Runs queued commands in batches through ``process``, ``concurrency`` batches at a time.

    With more than one batch in flight, the database works on one batch while
    Python prepares or answers another; batches that touch the same rows
    serialise on their locks in the database, in the order they started.

    ``process`` receives the batch in arrival order and returns one outcome per
    command, in the same order. If ``process`` itself raises, every command of
    the batch fails with that error (nothing of the batch was committed).
    """

    def __init__(
        self,
        name: str,
        process: Callable[[list[C]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 128,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self._process = process
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._in_flight: set[asyncio.Task[None]] = set()
        self._queue: deque[tuple[C, asyncio.Future[R], float]] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._running = False

    async def submit(self, command: C) -> R:
        """Queue ``command`` and wait for its outcome."""
        if not self._running:
            raise RuntimeError(f"{self.name} is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future, time.perf_counter()))
        self._wakeup.set()
        return await future

    async def run(self) -> None:
        """Process batches until :meth:`stop`; the queue is finished first."""
        self._running = True
        try:
            while not (self._stopping and not self._queue and not self._in_flight):
                if self._queue and len(self._in_flight) < self._concurrency:
                    size = min(len(self._queue), self._max_batch)
                    batch = [self._queue.popleft() for _ in range(size)]
                    task = asyncio.create_task(self._run_batch(batch))
                    self._in_flight.add(task)
                    task.add_done_callback(self._batch_done)
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            self._running = False
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            for _, future, _ in self._queue:
                if not future.done():
                    future.set_exception(RuntimeError(f"{self.name} stopped"))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wakeup.set()

    def stop(self) -> None:
        """Ask :meth:`run` to return once the queue is empty."""
        self._stopping = True
        self._wakeup.set()

    async def _run_batch(self, batch: list[tuple[C, asyncio.Future[R], float]]) -> None:
        started = time.perf_counter()
        labels = {"committer": self.name}
        metrics.GROUP_COMMIT_BATCH_SIZE.labels(**labels).observe(len(batch))
        for _, _, queued_at in batch:
            metrics.GROUP_COMMIT_QUEUE_SECONDS.labels(**labels).observe(started - queued_at)
        try:
            outcomes = list(await self._process([command for command, _, _ in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{self.name}: {len(outcomes)} outcomes for {len(batch)}")
        except Exception as error:  # the whole batch rolled back; each caller sees why
            log.warning("group_commit.batch_failed", committer=self.name, error=repr(error))
            outcomes = [error] * len(batch)
        except asyncio.CancelledError:
            # Cancelled mid-transaction (a forced stop): nobody may wait for ever.
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(RuntimeError(f"{self.name} stopped"))
            raise
        metrics.GROUP_COMMIT_SECONDS.labels(**labels).observe(time.perf_counter() - started)
        for (_, future, _), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller went away (cancelled call)
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
