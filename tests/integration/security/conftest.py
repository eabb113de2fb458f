"""Fixtures of the security tests: the fulfilment stack's world, and callers by role."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import grpc
import pytest

from omnistock.auth.tokens import Role
from omnistock.grpc.client import ChannelFactory
from tests.conftest import harness_auth
from tests.integration.reservation.conftest import shop
from tests.integration.routing.conftest import world

__all__ = ["shop", "world"]

# Opens a channel to a target as a caller with a role: (target, role, channels, locations).
Caller = Callable[
    [str, Role, Iterable[str], Iterable[str]], AbstractAsyncContextManager[grpc.aio.Channel]
]


@pytest.fixture
def as_caller(channels: ChannelFactory) -> Caller:
    """A channel carrying a token of ``role`` for ``channels`` / ``locations``."""

    @asynccontextmanager
    async def open_as(
        target: str, role: Role, channel_ids: Iterable[str] = (), locations: Iterable[str] = ()
    ) -> AsyncIterator[grpc.aio.Channel]:
        token = harness_auth().mint(role, channels=channel_ids, locations=locations)
        async with channels.with_token(token).open(target) as channel:
            yield channel

    return open_as
