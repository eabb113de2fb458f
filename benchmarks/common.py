"""Shared pieces of the benchmarks: a throw-away embedded stack and timing helpers.

The stack authenticates as in production: :func:`bench_stack` makes a
development key and exports ``OMNI_AUTH_JWKS_FILE`` and
``OMNI_SERVICE_TOKEN_FILE`` for the benchmark process and the services it
starts, and :func:`bench_channel` opens channels carrying the service token.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from omnistock.auth.dev import DevAuth
from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from omnistock.grpc.client import ChannelFactory, ChannelOptions
from omnistock.settings import Settings
from services.registry import prepare_all


@asynccontextmanager
async def bench_stack() -> AsyncIterator[EmbeddedStack]:
    """A durable embedded PostgreSQL + nats-server in a temporary folder, prepared."""
    with tempfile.TemporaryDirectory(prefix="omnistock-bench-") as folder:
        auth_env = DevAuth.ensure(Path(folder) / "auth").env()
        saved = {name: os.environ.get(name) for name in auth_env}
        os.environ.update(auth_env)
        stack = EmbeddedStack(Path(folder), free_port(), free_port(), free_port(), durable=True)
        stack.start()
        try:
            await prepare_all(stack.database_url, stack.nats_url)
            yield stack
        finally:
            stack.stop()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def bench_channel(target: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """A channel to a service of the bench stack, with the service token."""
    return ChannelFactory.from_settings(Settings()).open(target, options)


@contextmanager
def service_process(module: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run a service as its own process, as in production."""
    process = subprocess.Popen(
        [sys.executable, "-m", module], env={**os.environ, "OMNI_LOG_LEVEL": "WARNING", **env}
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass(frozen=True)
class Figure:
    """One measured scenario."""

    name: str
    operations: int
    units: int
    seconds: float
    # Seconds each successful operation took (only when measured with ``measure_for``).
    latencies: tuple[float, ...] = ()
    # Failed operations by kind (status code and message), not counted in ``units``.
    errors: Mapping[str, int] = field(default_factory=dict)

    @property
    def units_per_second(self) -> float:
        """Throughput in the scenario's unit (movements, calls, rows)."""
        return self.units / self.seconds

    def latency_ms(self, fraction: float) -> float:
        """The ``fraction`` percentile (0.5, 0.99) of the operations' latency, in ms."""
        return percentile(self.latencies, fraction) * 1000

    @property
    def failed(self) -> int:
        """Operations that raised."""
        return sum(self.errors.values())


async def measure(
    name: str, workers: int, operations_each: int, units_per_operation: int,
    operation: Callable[[int, int], Awaitable[None]],
) -> Figure:  # fmt: skip
    """Run ``operation(worker, n)`` from ``workers`` concurrent workers and time it all."""

    async def worker(number: int) -> None:
        for n in range(operations_each):
            await operation(number, n)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.perf_counter() - started
    operations = workers * operations_each
    return Figure(name, operations, operations * units_per_operation, elapsed)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (``fraction`` 0.5 is the median); NaN if none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0 (a scenario that did nothing)."""
    return numerator / denominator if denominator else math.nan


def describe_error(error: BaseException) -> str:
    """A short, groupable description of a failed operation."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {(error.details() or '')[:80]}"
    return f"{type(error).__name__}: {str(error)[:80]}"


async def measure_for(
    name: str, workers: int, seconds: float, operation: Callable[[int, int], Awaitable[None]],
    *, units_per_operation: int = 1,
) -> Figure:  # fmt: skip
    """Run ``operation(worker, n)`` in a closed loop from ``workers`` concurrent workers
    for ``seconds``, timing every call.

    Calls started within the window count; the window closes when the last of them
    returns. A call that raises is counted under ``errors`` and the loop goes on.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker(number: int) -> None:
        n = 0
        while (began := time.perf_counter()) < stop_at:
            try:
                await operation(number, n)
            except Exception as error:  # reported with the figure, never fatal
                errors[describe_error(error)] += 1
            else:
                latencies.append(time.perf_counter() - began)
            n += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.perf_counter() - started
    done = len(latencies)
    return Figure(
        name, done + sum(errors.values()), done * units_per_operation, elapsed,
        tuple(latencies), dict(errors),
    )  # fmt: skip


def print_latency_table(
    title: str,
    figures: Sequence[Figure],
    unit: str,
    baselines: Mapping[str, str],
    notes: Mapping[str, str] | None = None,
) -> None:
    """Print throughput, p50/p99 latency and failures of each figure, its ratios to the
    named baseline, and an optional note per figure on the line below it."""
    by_name = {f.name: f for f in figures}
    notes = notes or {}
    print(f"\n{title}")
    print(
        f"  {'scenario':<40} {unit + '/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}"
        "  ratio to baseline: rate, p99"
    )
    for figure in figures:
        base = by_name.get(baselines.get(figure.name, ""))
        compared = ""
        if base is not None:
            rate = ratio(figure.units_per_second, base.units_per_second)
            tail = ratio(figure.latency_ms(0.99), base.latency_ms(0.99))
            compared = f"{rate:5.2f} x, {tail:5.2f} x  ({base.name})"
        print(
            f"  {figure.name:<40} {figure.units_per_second:>10,.0f} "
            f"{figure.latency_ms(0.5):>8.2f} {figure.latency_ms(0.99):>8.2f} "
            f"{figure.failed:>6}  {compared}"
        )
        if notes.get(figure.name):
            print(f"      {notes[figure.name]}")


def print_table(title: str, figures: list[Figure], unit: str, baselines: dict[str, str]) -> None:
    """Print figures and, for each scenario, its ratio to the named baseline."""
    by_name = {f.name: f for f in figures}
    print(f"\n{title}")
    print(f"  {'scenario':<42} {unit + '/s':>14} {'ms/op':>9}  ratio")
    for figure in figures:
        base = baselines.get(figure.name)
        ratio = ""
        if base:
            ratio = f"{figure.units_per_second / by_name[base].units_per_second:6.2f} x {base}"
        per_op = figure.seconds / figure.operations * 1000
        print(f"  {figure.name:<42} {figure.units_per_second:>14,.0f} {per_op:>9.3f}  {ratio}")
