"""Benchmark: movements per second through the ledger's PostMovements.

Measured in one run, on the same machine and servers, so the ratios mean
something even on a noisy machine:
- a no-op gRPC call (health Check) on the same ledger process: the floor of any RPC;
- a raw asyncpg insert of the same movement rows (batches of 1 and of 100, one
  transaction each): the floor of the database work;
- PostMovements with batches of 1 and of 100 movements.

Run: ``make bench`` (or ``python -m benchmarks.ledger_post_movements --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import asyncpg
from grpc_health.v1 import health_pb2

from benchmarks.common import (
    Figure,
    bench_channel,
    bench_stack,
    measure,
    print_table,
    service_process,
)
from omni.common.v1 import types_pb2
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import ledger_service_pb2_grpc as pb_grpc
from omni.ledger.v1 import resources_pb2 as res
from omnistock.devstack.ports import free_port
from omnistock.devstack.supervisor import ServiceProcess
from omnistock.grpc.health import health_check

RAW_TABLE = """
CREATE TABLE IF NOT EXISTS bench_raw_movements (
    movement_id uuid PRIMARY KEY, device_id text NOT NULL, device_sequence bigint NOT NULL,
    kind text NOT NULL, sku text NOT NULL, location_id text NOT NULL, quantity bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(), UNIQUE (device_id, device_sequence))
"""


async def run(workers: int, single_calls: int, batches: int) -> list[Figure]:
    async with bench_stack() as stack:
        port = free_port()
        env = {
            "OMNI_DATABASE_URL": stack.database_url,
            "OMNI_NATS_URL": stack.nats_url,
            "OMNI_LEDGER_GRPC_PORT": str(port),
            "OMNI_LEDGER_METRICS_PORT": str(free_port()),
            "OMNI_DB_POOL_MAX_SIZE": str(max(10, workers + 2)),
        }
        with service_process("services.ledger", env):
            await ServiceProcess("ledger", "", f"127.0.0.1:{port}", {}).wait_serving()
            return await scenarios(stack.database_url, port, workers, single_calls, batches)


async def scenarios(
    dsn: str, port: int, workers: int, single_calls: int, batches: int
) -> list[Figure]:
    tag = uuid.uuid4().hex[:6]
    skus = [f"SKU-{tag}-{w}" for w in range(workers)]
    locations = [f"loc-{tag}-{w}" for w in range(workers)]
    async with bench_channel(f"127.0.0.1:{port}") as channel:
        ledger = pb_grpc.StockLedgerServiceStub(channel)
        await ledger.UpsertLocations(
            pb.UpsertLocationsRequest(
                request_id=f"bench-{tag}",
                locations=[
                    res.Location(
                        location_id=loc, kind=types_pb2.LOCATION_KIND_STORE, name=loc,
                        position=types_pb2.GeoPoint(latitude=52.1, longitude=5.1),
                    )
                    for loc in locations
                ],
            )
        )  # fmt: skip
        await ledger.UpsertSkus(
            pb.UpsertSkusRequest(
                request_id=f"bench-{tag}",
                skus=[res.Sku(sku=s, product_id="BENCH", name=s) for s in skus],
            )
        )
        check = health_check(channel)

        def movements(worker: int, first: int, count: int) -> list[res.MovementInput]:
            # Each worker is one scanner on its own stock: like a real store floor.
            return [
                res.MovementInput(
                    key=res.IdempotencyKey(device_id=f"bench-{tag}-{worker}", sequence=first + i),
                    sku=skus[worker],
                    location_id=locations[worker],
                    receipt=res.Receipt(quantity=1),
                )
                for i in range(count)
            ]

        async def noop(worker: int, n: int) -> None:
            await check(health_pb2.HealthCheckRequest())

        async def post_one(worker: int, n: int) -> None:
            await ledger.PostMovements(
                pb.PostMovementsRequest(movements=movements(worker, n + 1, 1))
            )

        async def warm_up_post(worker: int, n: int) -> None:
            await ledger.PostMovements(
                pb.PostMovementsRequest(movements=movements(worker, 900_000 + n, 1))
            )

        async def post_hundred(worker: int, n: int) -> None:
            first = 1_000_000 + n * 100
            await ledger.PostMovements(
                pb.PostMovementsRequest(movements=movements(worker, first, 100))
            )

        pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
        assert pool is not None
        await pool.execute(RAW_TABLE)

        async def raw(worker: int, n: int, size: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_raw_movements "
                    "(movement_id, device_id, device_sequence, kind, sku, location_id, quantity) "
                    "SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], "
                    "$5::text[], $6::text[], $7::bigint[])",
                    [uuid.uuid4() for _ in range(size)],
                    [f"raw-{tag}-{worker}"] * size,
                    [n * size + i for i in range(size)],
                    ["receipt"] * size,
                    [skus[worker]] * size,
                    [locations[worker]] * size,
                    [1] * size,
                )

        async def raw_one(worker: int, n: int) -> None:
            await raw(worker, n, 1)

        async def raw_hundred(worker: int, n: int) -> None:
            await raw(worker, 1_000_000 + n, 100)

        # Warm up connections, caches and prepared statements.
        await measure("warm-up", workers, 20, 1, noop)
        await measure("warm-up", workers, 5, 1, warm_up_post)
        figures = [
            await measure("no-op gRPC call (health Check)", workers, single_calls, 1, noop),
            await measure("raw asyncpg insert, batch of 1", workers, single_calls, 1, raw_one),
            await measure("PostMovements, batch of 1", workers, single_calls, 1, post_one),
            await measure("raw asyncpg insert, batch of 100", workers, batches, 100, raw_hundred),
            await measure("PostMovements, batch of 100", workers, batches, 100, post_hundred),
        ]
        await pool.close()
        levels = await ledger.GetStockLevels(pb.GetStockLevelsRequest(skus=skus))
        expected = workers * (single_calls + batches * 100 + 5)
        counted = sum(level.on_hand for level in levels.levels)
        assert counted == expected, f"benchmark lost or double-counted movements: {counted}"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (scanners)")
    parser.add_argument("--single-calls", type=int, default=250, help="batch-of-1 calls per worker")
    parser.add_argument("--batches", type=int, default=25, help="batch-of-100 calls per worker")
    args = parser.parse_args()
    figures = asyncio.run(run(args.workers, args.single_calls, args.batches))
    print_table(
        f"Ledger PostMovements, {args.workers} concurrent clients (movements or calls per second)",
        figures,
        "units",
        {
            "PostMovements, batch of 1": "raw asyncpg insert, batch of 1",
            "raw asyncpg insert, batch of 1": "no-op gRPC call (health Check)",
            "PostMovements, batch of 100": "raw asyncpg insert, batch of 100",
        },
    )
    by_name = {f.name: f for f in figures}
    single = by_name["PostMovements, batch of 1"].units_per_second
    noop = by_name["no-op gRPC call (health Check)"].units_per_second
    hundred = by_name["PostMovements, batch of 100"].units_per_second
    print(f"\n  PostMovements batch of 1 vs no-op gRPC call: {single / noop:.2f} x")
    print(f"  batching gain (batch of 100 vs batch of 1): {hundred / single:.1f} x")


if __name__ == "__main__":
    main()
