"""Fan-out of availability changes to WatchAvailability streams.

Pure asyncio, no I/O: the feed (``consumers.AvailabilityFeed``) offers every
figure it hears on NATS; each subscription keeps at most one unsent figure per
(sku, location), so a slow reader costs memory bounded by what it watches, and
never stalls the feed or other readers. A reader whose oldest unsent figure
waited longer than ``max_lag`` is dropped and told to resubscribe (checked on
every change and periodically by the feed). One client may hold at most
``max_per_client`` streams at once; one more is refused (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from omnistock.errors import ResourceExhausted
from services.reservation import metrics as m
from services.reservation.domain import Figure

FigureKey = tuple[str, str]  # (sku, location_id); location "" is the network figure
# Concurrent WatchAvailability streams one client may hold: a channel's
# storefront needs a handful; each stream costs memory for what it watches.
MAX_WATCHES_PER_CLIENT = 64


class Subscription:
    """One WatchAvailability stream's interest and its unsent figures."""

    def __init__(
        self,
        channel: str,
        skus: Iterable[str],
        location_ids: Iterable[str],
        client: str | None = None,
    ) -> None:
        self.channel = channel
        # Who holds the stream (counted against its limit until unsubscribed).
        self.client = client
        self.skus = frozenset(skus)
        self.location_ids = frozenset(location_ids)
        self.ready = asyncio.Event()
        self.fell_behind = False
        self.refresh = False
        self._pending: dict[FigureKey, Figure] = {}
        self._sent: dict[FigureKey, int] = {}
        self._oldest_pending: float | None = None

    def wants(self, figure: Figure) -> bool:
        """Whether the figure is one this stream watches."""
        return (
            figure.channel == self.channel
            and figure.sku in self.skus
            and (figure.location_id == "" or figure.location_id in self.location_ids)
        )

    def offer(self, figure: Figure, now: float) -> None:
        """Queue ``figure``, replacing an unsent one for the same key."""
        key = (figure.sku, figure.location_id)
        if figure.version <= self._sent.get(key, -1):
            m.WATCH_UPDATES.labels("stale").inc()
            return
        waiting = self._pending.get(key)
        if waiting is not None:
            if figure.version <= waiting.version:
                m.WATCH_UPDATES.labels("stale").inc()
                return
            m.WATCH_UPDATES.labels("coalesced").inc()
        self._pending[key] = figure
        if self._oldest_pending is None:
            self._oldest_pending = now
        self.ready.set()

    def refreshed(self, figures: Iterable[Figure]) -> None:
        """Queue re-read figures even at an unchanged version (the rules changed)."""
        for figure in figures:
            key = (figure.sku, figure.location_id)
            waiting = self._pending.get(key)
            if waiting is not None and waiting.version > figure.version:
                continue
            self._pending[key] = figure
            self._sent[key] = min(self._sent.get(key, -1), figure.version - 1)
        if self._pending:
            self.ready.set()

    def waited(self, now: float) -> float:
        """How long the oldest unsent figure has waited."""
        return 0.0 if self._oldest_pending is None else now - self._oldest_pending

    def mark_sent(self, figures: Iterable[Figure]) -> None:
        """Record figures sent outside :meth:`take` (the initial snapshot)."""
        for figure in figures:
            key = (figure.sku, figure.location_id)
            self._sent[key] = max(self._sent.get(key, -1), figure.version)

    def take(self) -> list[Figure]:
        """The unsent figures newer than what was sent, oldest key first; clears the queue."""
        fresh = [
            figure
            for key, figure in self._pending.items()
            if figure.version > self._sent.get(key, -1)
        ]
        self._pending.clear()
        self._oldest_pending = None
        self.ready.clear()
        self.mark_sent(fresh)
        m.WATCH_UPDATES.labels("sent").inc(len(fresh))
        return fresh


class AvailabilityHub:
    """Routes figures to the subscriptions that watch their SKU."""

    def __init__(
        self,
        *,
        max_lag: float,
        clock: Callable[[], float] = time.monotonic,
        max_per_client: int = MAX_WATCHES_PER_CLIENT,
    ) -> None:
        self._max_lag = max_lag
        self._clock = clock
        self._max_per_client = max_per_client
        self._by_sku: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._per_client: dict[str, int] = {}

    def subscribe(
        self,
        channel: str,
        skus: Iterable[str],
        location_ids: Iterable[str],
        *,
        client: str | None = None,
    ) -> Subscription:
        """Start receiving figures for ``skus`` of ``channel``.

        ``client`` names who watches — the caller's identity once calls carry
        one, else its connection (``context.peer()``); ``None`` is not counted.
        A client already holding ``max_per_client`` streams is refused with
        ``ResourceExhausted`` (reason ``TOO_MANY_WATCHES``) until it closes one.
        """
        if client is not None:
            holding = self._per_client.get(client, 0)
            if holding >= self._max_per_client:
                raise ResourceExhausted(
                    "TOO_MANY_WATCHES",
                    f"This client already holds {holding} WatchAvailability streams, the "
                    f"most one client may hold at once ({self._max_per_client}); close one "
                    "or watch more SKUs per stream.",
                    {"open_streams": str(holding), "limit": str(self._max_per_client)},
                )
            self._per_client[client] = holding + 1
        subscription = Subscription(channel, skus, location_ids, client)
        for sku in subscription.skus:
            self._by_sku.setdefault(sku, set()).add(subscription)
        self._all.add(subscription)
        m.WATCH_SUBSCRIBERS.set(len(self._all))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing figures to ``subscription``; safe to call twice."""
        for sku in subscription.skus:
            watchers = self._by_sku.get(sku)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._by_sku[sku]
        self._all.discard(subscription)
        m.WATCH_SUBSCRIBERS.set(len(self._all))
        client, subscription.client = subscription.client, None  # counted back once
        if client is not None:
            left = self._per_client.get(client, 0) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    def streams_of(self, client: str) -> int:
        """How many streams ``client`` holds now."""
        return self._per_client.get(client, 0)

    def publish(self, figures: Iterable[Figure]) -> None:
        """Offer ``figures`` to every subscription watching them."""
        now = self._clock()
        for figure in figures:
            for subscription in list(self._by_sku.get(figure.sku, ())):
                if subscription.wants(figure):
                    subscription.offer(figure, now)
                    if subscription.waited(now) > self._max_lag:
                        self._drop(subscription)

    def drop_lagging(self) -> int:
        """Drop every subscription whose oldest unsent figure waited over ``max_lag``.

        Called periodically, so a reader is told even when no new change arrives.
        """
        now = self._clock()
        lagging = [s for s in self._all if s.waited(now) > self._max_lag]
        for subscription in lagging:
            self._drop(subscription)
        return len(lagging)

    def rules_changed(self) -> None:
        """Every figure may have changed: each stream re-reads its snapshot."""
        for subscription in self._all:
            subscription.refresh = True
            subscription.ready.set()

    @property
    def subscriber_count(self) -> int:
        """Open subscriptions."""
        return len(self._all)

    def _drop(self, subscription: Subscription) -> None:
        self.unsubscribe(subscription)
        subscription.fell_behind = True
        subscription.ready.set()
        m.WATCH_DROPPED.inc()
