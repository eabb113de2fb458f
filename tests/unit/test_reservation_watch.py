"""Unit tests of the availability hub: routing, coalescing, staleness and slow readers."""

from __future__ import annotations

import asyncio

import pytest

from omnistock.errors import ResourceExhausted
from services.reservation.domain import Figure
from services.reservation.watch import AvailabilityHub, Subscription


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def figure(
    sku: str = "SKU-1",
    location_id: str = "store-a",
    version: int = 1,
    *,
    channel: str = "web",
    available: int = 5,
) -> Figure:
    return Figure(
        sku=sku,
        location_id=location_id,
        channel=channel,
        on_hand=available,
        reserved=0,
        safety_stock=0,
        available=available,
        low_stock=False,
        version=version,
    )


def hub(max_lag: float = 5.0) -> tuple[AvailabilityHub, FakeClock]:
    clock = FakeClock()
    return AvailabilityHub(max_lag=max_lag, clock=clock), clock


def keys(figures: list[Figure]) -> list[tuple[str, str, int]]:
    return [(f.sku, f.location_id, f.version) for f in figures]


# -- routing --------------------------------------------------------------------------


def test_a_subscriber_gets_only_figures_of_its_channel_skus_and_locations() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1", "SKU-2"], ["store-a"])
    hub_.publish(
        [
            figure("SKU-1", "store-a", 1),  # wanted
            figure("SKU-1", "store-b", 1),  # another location
            figure("SKU-3", "store-a", 1),  # another SKU
            figure("SKU-2", "store-a", 1, channel="pos"),  # another channel
            figure("SKU-2", "", 1),  # the network figure of a watched SKU
            figure("SKU-3", "", 1),  # the network figure of another SKU
            figure("SKU-1", "store-a", 1, channel=""),  # a location's own figure
        ]
    )
    assert keys(watcher.take()) == [("SKU-1", "store-a", 1), ("SKU-2", "", 1)]
    assert watcher.take() == []


def test_each_subscriber_sees_its_own_interest() -> None:
    hub_, _ = hub()
    web = hub_.subscribe("web", ["SKU-1"], ["store-a", "store-b"])
    pos = hub_.subscribe("pos", ["SKU-1"], ["store-a"])
    other = hub_.subscribe("web", ["SKU-2"], ["store-a"])
    hub_.publish(
        [
            figure("SKU-1", "store-b", 3),
            figure("SKU-1", "store-a", 4, channel="pos"),
            figure("SKU-1", "", 5),
        ]
    )
    assert keys(web.take()) == [("SKU-1", "store-b", 3), ("SKU-1", "", 5)]
    assert keys(pos.take()) == [("SKU-1", "store-a", 4)]
    assert other.take() == []
    assert not other.ready.is_set()


def test_ready_is_set_by_a_wanted_figure_and_cleared_by_take() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-2", "store-a", 1)])
    assert not watcher.ready.is_set()
    hub_.publish([figure("SKU-1", "store-a", 1)])
    assert watcher.ready.is_set()
    watcher.take()
    assert not watcher.ready.is_set()


async def test_a_waiting_reader_wakes_when_a_figure_arrives() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])

    async def read() -> list[Figure]:
        await watcher.ready.wait()
        return watcher.take()

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    assert not reader.done()
    hub_.publish([figure("SKU-1", "store-a", 2)])
    assert keys(await asyncio.wait_for(reader, 1)) == [("SKU-1", "store-a", 2)]


# -- coalescing and staleness ---------------------------------------------------------


def test_updates_of_one_key_before_the_reader_takes_them_coalesce_to_the_newest() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a", "store-b"])
    hub_.publish([figure("SKU-1", "store-a", 1, available=9)])
    hub_.publish([figure("SKU-1", "store-b", 1)])
    hub_.publish([figure("SKU-1", "store-a", 2, available=8)])
    hub_.publish([figure("SKU-1", "store-a", 3, available=7)])
    taken = watcher.take()
    assert keys(taken) == [("SKU-1", "store-a", 3), ("SKU-1", "store-b", 1)]
    assert taken[0].available == 7


def test_an_older_figure_arriving_late_does_not_replace_a_newer_unsent_one() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 5, available=1)])
    hub_.publish([figure("SKU-1", "store-a", 4, available=2)])
    hub_.publish([figure("SKU-1", "store-a", 5, available=3)])  # same version: a duplicate
    [taken] = watcher.take()
    assert (taken.version, taken.available) == (5, 1)


def test_versions_at_or_below_what_was_sent_are_dropped() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 3)])
    assert keys(watcher.take()) == [("SKU-1", "store-a", 3)]
    hub_.publish([figure("SKU-1", "store-a", 3), figure("SKU-1", "store-a", 2)])
    assert not watcher.ready.is_set()
    assert watcher.take() == []
    hub_.publish([figure("SKU-1", "store-a", 4)])
    assert keys(watcher.take()) == [("SKU-1", "store-a", 4)]


def test_figures_already_in_the_snapshot_are_not_sent_again() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 7), figure("SKU-1", "", 6)])  # during the read
    watcher.mark_sent([figure("SKU-1", "store-a", 7), figure("SKU-1", "", 5)])
    assert keys(watcher.take()) == [("SKU-1", "", 6)]


def test_staleness_is_tracked_per_key() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a", "store-b"])
    hub_.publish([figure("SKU-1", "store-a", 10)])
    watcher.take()
    hub_.publish([figure("SKU-1", "store-b", 2)])  # a low version, but of another key
    assert keys(watcher.take()) == [("SKU-1", "store-b", 2)]


# -- refresh after a rules change -----------------------------------------------------


def test_refreshed_requeues_figures_whose_version_did_not_change() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 4, available=6), figure("SKU-1", "", 4)])
    watcher.take()

    hub_.rules_changed()
    assert watcher.refresh is True
    assert watcher.ready.is_set()
    watcher.refresh = False
    watcher.refreshed([figure("SKU-1", "store-a", 4, available=2), figure("SKU-1", "", 4)])
    taken = watcher.take()
    assert keys(taken) == [("SKU-1", "store-a", 4), ("SKU-1", "", 4)]
    assert taken[0].available == 2
    # Once sent, the same version is stale again.
    hub_.publish([figure("SKU-1", "store-a", 4)])
    assert watcher.take() == []


def test_refreshed_keeps_a_newer_figure_that_arrived_meanwhile() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 4)])
    watcher.take()
    hub_.publish([figure("SKU-1", "store-a", 6, available=1)])
    watcher.refreshed([figure("SKU-1", "store-a", 5, available=3)])
    [taken] = watcher.take()
    assert (taken.version, taken.available) == (6, 1)


def test_refreshed_with_nothing_to_send_does_not_wake_the_reader() -> None:
    hub_, _ = hub()
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    watcher.refreshed([])
    assert not watcher.ready.is_set()


def test_rules_changed_asks_every_subscriber_to_refresh() -> None:
    hub_, _ = hub()
    watchers = [hub_.subscribe("web", ["SKU-1"], []), hub_.subscribe("pos", ["SKU-2"], [])]
    hub_.rules_changed()
    assert all(w.refresh and w.ready.is_set() for w in watchers)


# -- slow readers ---------------------------------------------------------------------


def test_a_reader_that_falls_behind_is_dropped_and_others_keep_receiving() -> None:
    hub_, clock = hub(max_lag=5.0)
    slow = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    fast = hub_.subscribe("web", ["SKU-1"], ["store-a"])

    hub_.publish([figure("SKU-1", "store-a", 1)])
    assert keys(fast.take()) == [("SKU-1", "store-a", 1)]
    clock.advance(6.0)
    hub_.publish([figure("SKU-1", "store-a", 2)])  # slow's oldest unsent waited 6 s

    assert slow.fell_behind is True
    assert slow.ready.is_set()
    assert fast.fell_behind is False
    assert hub_.subscriber_count == 1
    assert keys(fast.take()) == [("SKU-1", "store-a", 2)]

    hub_.publish([figure("SKU-1", "store-a", 3)])
    assert keys(fast.take()) == [("SKU-1", "store-a", 3)]
    assert slow.take() == [figure("SKU-1", "store-a", 2)]  # nothing after the drop


def test_a_reader_left_behind_by_the_last_change_is_dropped_by_the_periodic_check() -> None:
    hub_, clock = hub(max_lag=5.0)
    slow = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    fast = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 1)])  # the last change for a while
    fast.take()

    clock.advance(4.0)
    assert hub_.drop_lagging() == 0
    clock.advance(2.0)
    assert hub_.drop_lagging() == 1

    assert slow.fell_behind and slow.ready.is_set()
    assert not fast.fell_behind
    assert hub_.subscriber_count == 1


def test_waiting_exactly_max_lag_is_not_falling_behind() -> None:
    hub_, clock = hub(max_lag=5.0)
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 1)])
    clock.advance(5.0)
    hub_.publish([figure("SKU-1", "store-a", 2)])
    assert watcher.fell_behind is False
    assert hub_.subscriber_count == 1
    clock.advance(0.5)
    hub_.publish([figure("SKU-1", "store-a", 3)])
    assert watcher.fell_behind is True
    assert hub_.subscriber_count == 0


def test_the_lag_counts_from_the_oldest_unsent_figure_not_the_newest() -> None:
    hub_, clock = hub(max_lag=5.0)
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a", "store-b"])
    hub_.publish([figure("SKU-1", "store-a", 1)])
    for version in range(2, 5):
        clock.advance(2.0)  # each figure is fresh, but the reader has not read for 6 s
        hub_.publish([figure("SKU-1", "store-b", version)])
    assert watcher.fell_behind is True


def test_a_reader_that_keeps_up_is_never_dropped() -> None:
    hub_, clock = hub(max_lag=5.0)
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    for version in range(1, 20):
        hub_.publish([figure("SKU-1", "store-a", version)])
        clock.advance(4.0)
        assert keys(watcher.take()) == [("SKU-1", "store-a", version)]
    assert watcher.fell_behind is False
    assert hub_.subscriber_count == 1


def test_figures_a_reader_does_not_watch_never_make_it_fall_behind() -> None:
    hub_, clock = hub(max_lag=1.0)
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    for version in range(1, 5):
        clock.advance(10.0)
        hub_.publish([figure("SKU-1", "store-b", version), figure("SKU-2", "", version)])
    assert watcher.fell_behind is False
    assert not watcher.ready.is_set()


def test_a_drop_in_the_middle_of_a_publish_does_not_disturb_the_rest() -> None:
    hub_, clock = hub(max_lag=1.0)
    slow = hub_.subscribe("web", ["SKU-1", "SKU-2"], ["store-a"])
    fast = hub_.subscribe("web", ["SKU-1", "SKU-2"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 1)])
    fast.take()
    clock.advance(2.0)
    hub_.publish([figure("SKU-1", "store-a", 2), figure("SKU-2", "store-a", 2)])
    assert slow.fell_behind
    assert keys(fast.take()) == [("SKU-1", "store-a", 2), ("SKU-2", "store-a", 2)]
    assert keys(slow.take()) == [("SKU-1", "store-a", 2)]


# -- subscribing ----------------------------------------------------------------------


def test_unsubscribe_is_idempotent_and_stops_delivery() -> None:
    hub_, _ = hub()
    leaving = hub_.subscribe("web", ["SKU-1", "SKU-2"], ["store-a"])
    staying = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    assert hub_.subscriber_count == 2

    hub_.unsubscribe(leaving)
    hub_.unsubscribe(leaving)
    assert hub_.subscriber_count == 1
    hub_.publish([figure("SKU-1", "store-a", 1), figure("SKU-2", "store-a", 1)])
    assert leaving.take() == []
    assert keys(staying.take()) == [("SKU-1", "store-a", 1)]

    hub_.unsubscribe(staying)
    hub_.unsubscribe(staying)
    assert hub_.subscriber_count == 0
    hub_.publish([figure("SKU-1", "store-a", 2)])
    assert staying.take() == []


def test_unsubscribing_a_dropped_reader_is_harmless() -> None:
    hub_, clock = hub(max_lag=1.0)
    watcher = hub_.subscribe("web", ["SKU-1"], ["store-a"])
    hub_.publish([figure("SKU-1", "store-a", 1)])
    clock.advance(2.0)
    hub_.publish([figure("SKU-1", "store-a", 2)])
    assert watcher.fell_behind
    hub_.unsubscribe(watcher)
    assert hub_.subscriber_count == 0


def test_a_subscription_can_be_built_on_its_own() -> None:
    watcher = Subscription("web", ["SKU-1", "SKU-1"], ["store-a"])
    assert watcher.skus == frozenset({"SKU-1"})
    assert watcher.wants(figure("SKU-1", "store-a", 1))
    assert not watcher.wants(figure("SKU-1", "store-b", 1))
    assert watcher.waited(5.0) == 0.0
    watcher.offer(figure("SKU-1", "store-a", 1), now=5.0)
    assert watcher.waited(7.5) == 2.5
    watcher.take()
    assert watcher.waited(100.0) == 0.0


# -- streams per client ---------------------------------------------------------------


def test_a_client_holding_its_limit_of_streams_is_refused_until_it_closes_one() -> None:
    hub_ = AvailabilityHub(max_lag=5.0, max_per_client=2)
    first = hub_.subscribe("web", ["SKU-1"], ["store-a"], client="ipv4:10.0.0.1:5000")
    hub_.subscribe("web", ["SKU-2"], ["store-a"], client="ipv4:10.0.0.1:5000")
    with pytest.raises(ResourceExhausted) as refused:
        hub_.subscribe("web", ["SKU-3"], ["store-a"], client="ipv4:10.0.0.1:5000")
    assert refused.value.reason == "TOO_MANY_WATCHES"
    assert "(2)" in refused.value.message
    assert refused.value.metadata == {"open_streams": "2", "limit": "2"}
    assert hub_.subscriber_count == 2  # the refused one holds nothing

    # Another client, and calls that name no client, are not counted against it.
    hub_.subscribe("web", ["SKU-1"], ["store-a"], client="ipv4:10.0.0.2:6000")
    hub_.subscribe("web", ["SKU-1"], ["store-a"])
    assert hub_.streams_of("ipv4:10.0.0.2:6000") == 1

    hub_.unsubscribe(first)
    hub_.unsubscribe(first)  # twice: counted back once
    assert hub_.streams_of("ipv4:10.0.0.1:5000") == 1
    hub_.subscribe("web", ["SKU-3"], ["store-a"], client="ipv4:10.0.0.1:5000")
    with pytest.raises(ResourceExhausted):
        hub_.subscribe("web", ["SKU-4"], ["store-a"], client="ipv4:10.0.0.1:5000")


def test_a_dropped_slow_reader_gives_its_clients_place_back() -> None:
    clock = FakeClock()
    hub_ = AvailabilityHub(max_lag=1.0, clock=clock, max_per_client=1)
    slow = hub_.subscribe("web", ["SKU-1"], ["store-a"], client="peer-1")
    hub_.publish([figure("SKU-1", "store-a", 1)])
    clock.advance(2.0)
    assert hub_.drop_lagging() == 1 and slow.fell_behind
    assert hub_.streams_of("peer-1") == 0
    again = hub_.subscribe("web", ["SKU-1"], ["store-a"], client="peer-1")
    hub_.unsubscribe(slow)  # the old stream's own clean-up frees nothing twice
    assert hub_.streams_of("peer-1") == 1
    hub_.unsubscribe(again)
    assert hub_.streams_of("peer-1") == 0
