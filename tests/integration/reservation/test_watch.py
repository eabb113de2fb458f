"""WatchAvailability end to end: a scanner's receipt at the ledger reaches a stream
opened before it; holds move the figures; a reader that stops reading stalls nobody."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from omni.reservation.v1 import reservation_service_pb2 as pb
from omni.reservation.v1 import reservation_service_pb2_grpc as pb_grpc
from omni.reservation.v1 import resources_pb2 as res
from omnistock.grpc.client import ChannelFactory
from omnistock.service import RunningService
from tests.conftest import ReservationStub
from tests.integration.helpers import failure
from tests.integration.reservation.conftest import Shop


class Watch:
    """A WatchAvailability stream read figure by figure."""

    def __init__(
        self, shop: Shop, sku: str, store: str, stub: ReservationStub | None = None
    ) -> None:
        self.call = (stub or shop.reservations).WatchAvailability(
            pb.WatchAvailabilityRequest(channel=shop.channel, skus=[sku], location_ids=[store])
        )
        self._stream = self.call.__aiter__()
        self._unread: list[res.Availability] = []

    async def message(self) -> pb.WatchAvailabilityResponse:
        """The next whole message (used for the snapshot)."""
        return await asyncio.wait_for(self._stream.__anext__(), 10)

    async def next_figure(
        self, accept: Callable[[res.Availability], bool], within: float = 10.0
    ) -> res.Availability:
        """Read figures until one passes ``accept``; skipped figures are dropped."""

        async def read() -> res.Availability:
            while True:
                while self._unread:
                    figure = self._unread.pop(0)
                    if accept(figure):
                        return figure
                self._unread = list((await self._stream.__anext__()).figures)

        return await asyncio.wait_for(read(), within)

    async def drain(self, within: float = 20.0) -> None:
        """Read to the end of the stream."""

        async def read() -> None:
            async for _ in self._stream:
                pass

        await asyncio.wait_for(read(), within)


async def test_a_receipt_at_the_ledger_reaches_a_stream_opened_before_it(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    watch = Watch(shop, sku, store)
    first = await watch.message()
    assert first.snapshot
    assert {(f.location_id, f.available) for f in first.figures} == {("", 0), (store, 0)}

    await shop.receive(sku, store, 7)  # a scanner at the ledger; nothing else is called

    at_store = await watch.next_figure(lambda f: f.location_id == store and f.on_hand == 7)
    assert (at_store.channel, at_store.available) == (shop.channel, 7)
    online = await watch.next_figure(lambda f: f.location_id == "" and f.available == 7)
    assert online.version >= at_store.version
    watch.call.cancel()


async def test_the_low_stock_flag_is_true_when_sent(shop: Shop) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.set_rules(low_stock_threshold=3)
    await shop.stock(sku, store, 10)
    watch = Watch(shop, sku, store)
    snapshot = await watch.message()
    assert not any(f.low_stock for f in snapshot.figures)

    await shop.reserve([(sku, store, 8)])  # sales elsewhere leave two

    low = await watch.next_figure(lambda f: f.location_id == store and f.low_stock)
    assert low.available == 2
    watch.call.cancel()


async def test_a_reader_that_stops_reading_stalls_nobody_and_is_told_to_resubscribe(
    shop: Shop, reservation_service: RunningService, channels: ChannelFactory
) -> None:
    sku, store = shop.skus[0], shop.stores[0]
    await shop.stock(sku, store, 5000)
    # A slow device: a tiny receive window and no window growth, so the server's
    # writes to it block as soon as a few messages are unread.
    slow_link = channels.open(
        f"127.0.0.1:{reservation_service.grpc_port}",
        options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)],
    )
    idle = Watch(shop, sku, store, pb_grpc.ReservationServiceStub(slow_link))
    await idle.message()  # subscribed; then never reads again
    busy = Watch(shop, sku, store)
    await busy.message()

    # Enough changes to fill the idle stream's transport window many times over.
    async def churn() -> None:
        for _ in range(60):
            await asyncio.gather(*(shop.reserve([(sku, store, 1)]) for _ in range(25)))

    churning = asyncio.create_task(churn())
    seen = 0
    reserved = 0
    # Read until the figure of the last hold arrives; do not also wait for the churn
    # task to finish. That figure can reach the stream before the last Reserve
    # response reaches the churn task, and nothing changes after it, so no further
    # figure would ever come to end the loop.
    while reserved < 1500:
        if churning.done():
            churning.result()  # a failed hold shows itself, not a wait for its figure
        figure = await busy.next_figure(lambda f: f.location_id == store)
        seen += 1
        reserved = figure.reserved
    await churning
    assert reserved == 1500  # the reading stream got the final figure promptly
    assert seen < 1500 + 10  # and coalesced updates rather than one per hold

    await asyncio.sleep(3.0)  # past the 2 s lag limit of the test settings
    # The idle reader was dropped and is told so once it reads again.
    outcome = None
    try:
        await idle.drain()
    except grpc.aio.AioRpcError as error:
        outcome = failure(error)
    assert outcome is not None and outcome.code == grpc.StatusCode.ABORTED
    assert outcome.info is not None and outcome.info.reason == "WATCH_FELL_BEHIND"
    busy.call.cancel()
    await slow_link.close()
