"""Benchmark: the cost of ``sync_interval: always`` for acknowledged JetStream publishes.

Two nats-servers started in the same run, identical but for the fsync policy:
``always`` (fsync before every acknowledgement; an acked event survives a
SIGKILL or power loss) and the default (fsync every 2 minutes; acked events can
be lost if the machine dies). Measured like the outbox relay publishes: one
acknowledged publish at a time, and pipelined batches of 256 (publish_async).

Run: ``python -m benchmarks.jetstream_sync``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import nats
from nats.js.api import StreamConfig

from benchmarks.common import Figure, measure, print_table
from omnistock.devstack.nats import EmbeddedNats
from omnistock.devstack.ports import free_port


async def publish_figures(url: str, label: str, messages: int) -> list[Figure]:
    client = await nats.connect(url)
    js = client.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], duplicate_window=120))
    payload = b"x" * 600  # about the size of a StockMoved envelope

    async def one(worker: int, n: int) -> None:
        await js.publish("bench.one", payload, headers={"Nats-Msg-Id": f"one-{n}"})

    async def batch(worker: int, n: int) -> None:
        acks = [
            await js.publish_async(
                "bench.batch", payload, headers={"Nats-Msg-Id": f"batch-{n}-{i}"}
            )
            for i in range(256)
        ]
        await asyncio.gather(*acks)

    figures = [
        await measure(f"{label}: one publish at a time", 1, messages, 1, one),
        await measure(f"{label}: pipelined batches of 256", 1, max(1, messages // 64), 256, batch),
    ]
    await client.close()
    return figures


async def run(messages: int) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="omnistock-bench-") as folder:
        for label, sync_always in (("sync default (2m)", False), ("sync always", True)):
            server = EmbeddedNats(
                Path(folder) / label.replace(" ", "-") / "js", free_port(), free_port(),
                sync_always=sync_always,
            )  # fmt: skip
            server.start()
            try:
                figures += await publish_figures(server.url, label, messages)
            finally:
                server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="JetStream fsync policy cost")
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    figures = asyncio.run(run(args.messages))
    print_table(
        "JetStream acknowledged publishes (messages per second)",
        figures,
        "msgs",
        {
            "sync always: one publish at a time": "sync default (2m): one publish at a time",
            "sync always: pipelined batches of 256": "sync default (2m): pipelined batches of 256",
        },
    )


if __name__ == "__main__":
    main()
