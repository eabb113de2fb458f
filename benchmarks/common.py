"""Shared pieces of the benchmarks: a throw-away embedded stack and timing helpers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from omnistock.devstack.ports import free_port
from omnistock.devstack.stack import EmbeddedStack
from services.registry import prepare_all


@asynccontextmanager
async def bench_stack() -> AsyncIterator[EmbeddedStack]:
    """A durable embedded PostgreSQL + nats-server in a temporary folder, prepared."""
    with tempfile.TemporaryDirectory(prefix="omnistock-bench-") as folder:
        stack = EmbeddedStack(Path(folder), free_port(), free_port(), free_port(), durable=True)
        stack.start()
        try:
            await prepare_all(stack.database_url, stack.nats_url)
            yield stack
        finally:
            stack.stop()


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

    @property
    def units_per_second(self) -> float:
        """Throughput in the scenario's unit (movements, calls, rows)."""
        return self.units / self.seconds


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
