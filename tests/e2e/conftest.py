"""Fixtures of the end-to-end tests: the four services as separate processes.

``e2e_servers`` is one embedded PostgreSQL and one nats-server for the e2e
session (their own, apart from the in-process harness of the integration
tests, whose services would otherwise share the durable consumers).
``process_stack`` runs the four services on them with the test timings of
:mod:`tests.e2e.harness`, started once per session (and healed after a test
that killed something); tests use fresh ids, so they do not see each other's
data. A test that needs other settings starts a stack of its
own with ``start_process_stack({"OMNI_...": value})`` (a few seconds each: keep
them few). When a test using a process stack fails, the report shows the tail
of every service's log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from omnistock.devstack.stack import EmbeddedStack
from omnistock.logs import configure_logging
from services.registry import prepare_all
from tests.conftest import throwaway_servers
from tests.e2e.harness import ProcessStack, StackStarter, active_stacks, open_process_stack


@pytest.fixture(scope="session")
def e2e_servers() -> Iterator[EmbeddedStack]:
    """PostgreSQL and nats-server for the e2e session (each stack prepares its own database)."""
    configure_logging("WARNING", "console")
    with throwaway_servers("omnistock-e2e-") as servers:
        yield servers


@pytest.fixture(scope="session")
async def session_process_stack(
    e2e_servers: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ProcessStack]:
    """The four services as processes on the session's servers, serving."""
    await prepare_all(e2e_servers.database_url, e2e_servers.nats_url)
    assert e2e_servers.nats is not None
    stack = ProcessStack(
        database_url=e2e_servers.database_url,
        nats=e2e_servers.nats,
        log_dir=tmp_path_factory.mktemp("e2e-logs"),
    )
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


@pytest.fixture
async def process_stack(session_process_stack: ProcessStack) -> AsyncIterator[ProcessStack]:
    """The session's process stack, serving; whatever a test killed is back afterwards."""
    await session_process_stack.heal()
    yield session_process_stack
    await session_process_stack.heal()


@pytest.fixture
def start_process_stack(e2e_servers: EmbeddedStack, tmp_path: Path) -> StackStarter:
    """Start a stack of one's own with ``OMNI_*`` overrides, as an async context manager:

    ``async with start_process_stack({"OMNI_FULFILMENT_PICKUP_WINDOW_DAYS": 0.0001}) as s:``
    """
    started = 0

    def start(overrides: Mapping[str, object]) -> AbstractAsyncContextManager[ProcessStack]:
        nonlocal started
        started += 1
        return open_process_stack(e2e_servers, tmp_path / f"stack-{started}", overrides)

    return start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that ran against process stacks shows the end of every log."""
    report = yield
    if report.failed and "e2e_servers" in getattr(item, "fixturenames", ()):
        for stack in active_stacks():
            for title, text in stack.failure_sections():
                report.sections.append((f"log of {title}", text))
    return report
