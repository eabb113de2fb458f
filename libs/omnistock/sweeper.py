"""Periodic sweepers (hold expiry, task timeouts) with their metrics.

A sweeper's cycle must be safe with several replicas running the same sweeper
at once: it claims its rows with ``FOR UPDATE SKIP LOCKED`` and re-checks them
under the lock, so each item is acted on exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from omnistock import metrics
from omnistock.logs import get_logger

log = get_logger(__name__)


class Sweeper:
    """Calls ``sweep`` every ``interval`` seconds until stopped.

    ``sweep`` returns how many items it acted on; when it acted on a full batch
    (``batch_size``) it runs again at once, so a backlog drains without waiting.
    """

    def __init__(
        self,
        name: str,
        sweep: Callable[[], Awaitable[int]],
        *,
        interval: float,
        batch_size: int,
    ) -> None:
        self.name = name
        self._sweep = sweep
        self._interval = interval
        self._batch_size = batch_size
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Sweep until :meth:`stop`; a failed cycle is logged, counted and retried."""
        while not self._stopping.is_set():
            started = time.perf_counter()
            acted = 0
            try:
                acted = await self._sweep()
            except Exception as error:  # a database blip must not end the sweeper
                metrics.SWEEPER_RUNS.labels(sweeper=self.name, outcome="failed").inc()
                log.warning("sweeper.failed", sweeper=self.name, error=repr(error))
            else:
                metrics.SWEEPER_RUNS.labels(sweeper=self.name, outcome="ok").inc()
                metrics.SWEEPER_ITEMS.labels(sweeper=self.name).inc(acted)
                metrics.SWEEPER_LAST_SUCCESS.labels(sweeper=self.name).set(time.time())
            metrics.SWEEPER_SECONDS.labels(sweeper=self.name).observe(time.perf_counter() - started)
            if acted >= self._batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the cycle in hand."""
        self._stopping.set()
