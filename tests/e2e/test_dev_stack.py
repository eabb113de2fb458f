"""`omni dev run` (what `make run` starts), end to end, as a user meets it.

The whole stack runs as a real subprocess on free ports with its own state
folder: embedded PostgreSQL and nats-server, migrations, streams, the ledger
service and the demo data. A scanner posts a receipt over gRPC, the StockMoved
event appears on JetStream, the metrics endpoint counts the call; Ctrl-C stops
everything; a second start finds the same data and loads nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from omni.common.v1 import event_pb2
from omni.ledger.v1 import events_pb2
from omni.ledger.v1 import ledger_service_pb2 as pb
from omni.ledger.v1 import ledger_service_pb2_grpc as pb_grpc
from omni.ledger.v1 import resources_pb2 as res
from omni.reservation.v1 import reservation_service_pb2 as reservation_pb
from omni.reservation.v1 import reservation_service_pb2_grpc as reservation_grpc
from omnistock.devstack.ports import free_port
from omnistock.grpc.client import ChannelFactory
from omnistock.messaging.envelope import unpack
from tests.conftest import LedgerStub, ReservationStub

READY = "Omnistock is running"


class DevRun:
    """One `omni dev run` process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "dev", "run",
            env=self.environment(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await asyncio.wait_for(self._read_until(READY), timeout=120)

    async def _read_until(self, marker: str) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            line = (await self.process.stdout.readline()).decode()
            if not line:
                raise AssertionError("dev run exited early:\n" + "".join(self.output[-40:]))
            self.output.append(line)
            if marker in line:
                return

    async def interrupt(self) -> int:
        """Ctrl-C, then wait for a clean exit; returns the exit code."""
        assert self.process is not None and self.process.stdout is not None
        self.process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(self.process.communicate(), timeout=60)
        self.output.append(rest.decode())
        return await self.process.wait()

    def environment(self) -> dict[str, str]:
        # Never a developer's configured servers: this test is about the embedded stack.
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in {"OMNI_DATABASE_URL", "OMNI_NATS_URL"}
        }
        return {**inherited, **self.env}

    def text(self) -> str:
        return "".join(self.output)

    def token(self, name: str) -> ChannelFactory:
        """Channels carrying the development token printed as ``name``."""
        prefix = f"  {name}="
        printed = [line for line in self.output if line.startswith(prefix)]
        assert printed, f"no {name} printed"
        return ChannelFactory(token=printed[-1][len(prefix) :].strip())


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A folder for the dev run's state outside pytest's temporary root: another pytest
    session on the machine resets that root to owner-only access, which the embedded
    PostgreSQL (an unprivileged user when run as root) then cannot enter."""
    with tempfile.TemporaryDirectory(prefix="omnistock-devrun-") as folder:
        yield Path(folder)


async def test_make_run_serves_the_demo_and_restarts_on_the_same_data(state_root: Path) -> None:
    tmp_path = state_root
    names = ("pg", "nats", "mon", "grpc", "metrics", "reservation", "reservation_metrics")
    ports = {name: free_port() for name in names}
    env = {
        "OMNI_STATE_DIR": str(tmp_path / "state"),
        "OMNI_DEV_POSTGRES_PORT": str(ports["pg"]),
        "OMNI_DEV_NATS_PORT": str(ports["nats"]),
        "OMNI_DEV_NATS_MONITOR_PORT": str(ports["mon"]),
        "OMNI_LEDGER_GRPC_PORT": str(ports["grpc"]),
        "OMNI_LEDGER_METRICS_PORT": str(ports["metrics"]),
        "OMNI_RESERVATION_GRPC_PORT": str(ports["reservation"]),
        "OMNI_RESERVATION_METRICS_PORT": str(ports["reservation_metrics"]),
        "OMNI_LOG_LEVEL": "WARNING",
        # Never the default ports: another stack on the machine may hold them.
        **{
            f"OMNI_{name}_{kind}_PORT": str(free_port())
            for name in ("ROUTING", "FULFILMENT")
            for kind in ("GRPC", "METRICS")
        },
    }
    first = DevRun(env)
    await first.start()
    try:
        assert "607 opening receipts (607 newly recorded), 3 channels" in first.text()

        nc = await nats.connect(f"nats://127.0.0.1:{ports['nats']}")
        js = nc.jetstream()
        start = (await js.stream_info("OMNI_LEDGER")).state.last_seq + 1
        # Without a token the ledger refuses; with the printed scanner token
        # (store-utrecht is one of its locations) it answers.
        async with ChannelFactory().open(f"127.0.0.1:{ports['grpc']}") as channel:
            anonymous: LedgerStub = pb_grpc.StockLedgerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await anonymous.ListLocations(pb.ListLocationsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with first.token("OMNI_TOKEN_SCANNER").open(f"127.0.0.1:{ports['grpc']}") as channel:
            ledger: LedgerStub = pb_grpc.StockLedgerServiceStub(channel)
            before = await ledger.GetStockLevels(
                pb.GetStockLevelsRequest(skus=["JKT-RAIN-NVY-M"], location_ids=["store-utrecht"])
            )
            posted = await ledger.PostMovements(
                pb.PostMovementsRequest(
                    movements=[
                        res.MovementInput(
                            key=res.IdempotencyKey(device_id="scanner-utrecht-07", sequence=1),
                            sku="JKT-RAIN-NVY-M",
                            location_id="store-utrecht",
                            receipt=res.Receipt(quantity=12),
                        )
                    ]
                )
            )
        on_hand_before = sum(level.on_hand for level in before.levels)
        assert posted.results[0].movement.postings[0].on_hand_after == on_hand_before + 12

        subscription = await js.pull_subscribe(
            "omni.ledger.stock.moved",
            stream="OMNI_LEDGER",
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        # The relay may still be publishing the demo's opening stock: look for ours.
        wanted = posted.results[0].movement.movement_id
        seen = 0
        for _ in range(20):
            try:
                batch = await subscription.fetch(200, timeout=1)
            except TimeoutError:
                break
            for message in batch:
                envelope = event_pb2.EventEnvelope.FromString(message.data)
                moved = unpack(envelope, events_pb2.StockMoved)
                assert moved is not None
                seen += moved.movement.movement_id == wanted
        assert seen == 1
        await nc.close()

        # The reservation service projected the receipt: the web channel can promise it.
        reservation_address = f"127.0.0.1:{ports['reservation']}"
        web = first.token("OMNI_TOKEN_CHANNEL_WEB")
        async with web.open(reservation_address) as channel:
            reservations: ReservationStub = reservation_grpc.ReservationServiceStub(channel)
            request = reservation_pb.GetAvailabilityRequest(
                channel="web", skus=["JKT-RAIN-NVY-M"], location_ids=["store-utrecht"]
            )
            for _ in range(100):
                found = await reservations.GetAvailability(request)
                figure = found.availability[0].locations[0]
                if figure.on_hand == on_hand_before + 12:
                    break
                await asyncio.sleep(0.1)
        assert (figure.on_hand, figure.safety_stock) == (on_hand_before + 12, 1)
        assert figure.available == on_hand_before + 11

        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        scraped = await asyncio.to_thread(
            lambda: urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        )
        assert 'grpc_method="PostMovements"' in scraped
        assert 'omni_ledger_movements_total{kind="receipt"}' in scraped
        reservation_metrics = f"http://127.0.0.1:{ports['reservation_metrics']}/metrics"
        scraped = await asyncio.to_thread(
            lambda: urllib.request.urlopen(reservation_metrics, timeout=5).read().decode()
        )
        assert 'grpc_method="GetAvailability"' in scraped
        assert 'omni_consumer_messages_total{consumer="reservation-ledger"' in scraped
    finally:
        exit_code = await first.interrupt()
    assert exit_code == 0, first.text()[-3000:]
    assert f"ledger       127.0.0.1:{ports['grpc']}" in first.text()
    assert "stopped." in first.text()
    assert not (tmp_path / "state" / "postgres" / "data" / "postmaster.pid").exists()

    second = DevRun(env)
    await second.start()
    try:
        assert "607 opening receipts (0 newly recorded), 3 channels" in second.text()
        # The key was kept: a token printed by the first run still works.
        async with first.token("OMNI_TOKEN_SCANNER").open(f"127.0.0.1:{ports['grpc']}") as channel:
            ledger = pb_grpc.StockLedgerServiceStub(channel)
            after = await ledger.GetStockLevels(
                pb.GetStockLevelsRequest(skus=["JKT-RAIN-NVY-M"], location_ids=["store-utrecht"])
            )
        assert sum(level.on_hand for level in after.levels) == on_hand_before + 12
    finally:
        assert await second.interrupt() == 0


async def test_a_busy_port_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = server.sockets[0].getsockname()[1]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "dev", "run",
            env={
                **DevRun({}).environment(),
                "OMNI_STATE_DIR": str(tmp_path / "state"),
                "OMNI_DEV_POSTGRES_PORT": str(busy),
            },
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        server.close()
        await server.wait_closed()
    assert process.returncode == 1
    assert f"port {busy} for the embedded PostgreSQL is in use" in err.decode()
    assert "Traceback" not in err.decode()
