"""Connecting to NATS the same way in every process."""

from __future__ import annotations

import nats
from nats.aio.client import Client

from omnistock.logs import get_logger

log = get_logger(__name__)


async def connect(url: str, name: str) -> Client:
    """Connect with reconnects on and connection events logged."""

    async def on_error(error: Exception) -> None:
        log.warning("nats.error", error=repr(error))

    holder: list[Client] = []

    async def on_disconnected() -> None:
        # Closing or draining on purpose also disconnects; only warn about the unplanned.
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            log.warning("nats.disconnected")

    async def on_reconnected() -> None:
        log.info("nats.reconnected")

    client: Client = await nats.connect(
        servers=[server.strip() for server in url.split(",")],
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
    )
    holder.append(client)
    return client
