"""Unit tests of the group committer and the periodic sweeper: pure asyncio, no I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from omnistock.group_commit import GroupCommitter
from omnistock.sweeper import Sweeper

TIMEOUT = 2.0


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], rounds: int = 1000) -> None:
    """Let other tasks run until ``condition`` holds; fail if it never does."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class Recorder:
    """A ``process`` that records its batches and can be held at the door."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, commands: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(commands))
        await self.gate.wait()
        return [command * 10 for command in commands]


async def started(committer: GroupCommitter[int, int]) -> asyncio.Task[None]:
    task = asyncio.create_task(committer.run())
    await settle()
    return task


async def stopped(committer: GroupCommitter[int, int], task: asyncio.Task[None]) -> None:
    committer.stop()
    await asyncio.wait_for(task, TIMEOUT)


# -- group commit ---------------------------------------------------------------------


async def test_commands_queued_during_a_batch_form_the_next_batch() -> None:
    process = Recorder()
    process.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)

    first = asyncio.create_task(committer.submit(0))
    await until(lambda: len(process.batches) == 1)
    rest = [asyncio.create_task(committer.submit(n)) for n in range(1, 11)]
    await settle()
    assert process.batches == [[0]]  # the first batch is still running

    process.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT)
    assert results == [n * 10 for n in range(11)]
    assert process.batches == [[0], list(range(1, 11))]
    await stopped(committer, task)


async def test_a_batch_never_exceeds_max_batch() -> None:
    process = Recorder()
    process.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process, max_batch=4)
    task = await started(committer)

    calls = [asyncio.create_task(committer.submit(n)) for n in range(11)]
    await until(lambda: len(process.batches) == 1)
    await settle()
    process.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT) == [n * 10 for n in range(11)]
    assert process.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    await stopped(committer, task)


async def test_a_lone_command_is_processed_without_waiting_for_company() -> None:
    process = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)
    assert await asyncio.wait_for(committer.submit(7), TIMEOUT) == 70
    assert await asyncio.wait_for(committer.submit(8), TIMEOUT) == 80
    assert process.batches == [[7], [8]]
    await stopped(committer, task)


async def test_a_command_refused_alone_fails_only_its_own_caller() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def process(commands: list[int]) -> list[int | BaseException]:
        batches.append(commands)
        await gate.wait()
        return [ValueError(f"refused {c}") if c % 2 else c * 10 for c in commands]

    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)
    blocker = asyncio.create_task(committer.submit(0))
    await until(lambda: len(batches) == 1)
    calls = [asyncio.create_task(committer.submit(n)) for n in range(1, 5)]
    await settle()
    gate.set()

    outcomes = await asyncio.wait_for(
        asyncio.gather(blocker, *calls, return_exceptions=True), TIMEOUT
    )
    assert batches == [[0], [1, 2, 3, 4]]
    assert outcomes[0] == 0
    assert outcomes[2] == 20
    assert outcomes[4] == 40
    for index in (1, 3):
        error = outcomes[index]
        assert isinstance(error, ValueError)
        assert str(error) == f"refused {index}"
    await stopped(committer, task)


async def test_a_failing_process_fails_every_caller_of_its_batch_and_only_those() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def process(commands: list[int]) -> list[int | BaseException]:
        batches.append(commands)
        await gate.wait()
        if 2 in commands:
            raise ConnectionError("database went away")
        return [c * 10 for c in commands]

    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)
    first = asyncio.create_task(committer.submit(1))
    await until(lambda: len(batches) == 1)
    doomed = [asyncio.create_task(committer.submit(n)) for n in (2, 3, 4)]
    await settle()
    gate.set()

    assert await asyncio.wait_for(first, TIMEOUT) == 10
    outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), TIMEOUT)
    assert batches == [[1], [2, 3, 4]]
    assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes
    # The committer survives the failed batch.
    assert await asyncio.wait_for(committer.submit(5), TIMEOUT) == 50
    assert not task.done()
    await stopped(committer, task)


async def test_a_caller_that_went_away_does_not_disturb_the_batch() -> None:
    process = Recorder()
    process.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)
    blocker = asyncio.create_task(committer.submit(0))
    await until(lambda: len(process.batches) == 1)
    leaving = asyncio.create_task(committer.submit(1))
    staying = asyncio.create_task(committer.submit(2))
    await settle()
    leaving.cancel()
    await settle()
    process.gate.set()

    assert await asyncio.wait_for(staying, TIMEOUT) == 20
    assert await asyncio.wait_for(blocker, TIMEOUT) == 0
    assert leaving.cancelled()
    assert process.batches == [[0], [1, 2]]  # it was queued, so it was still processed
    await stopped(committer, task)


async def test_stop_finishes_the_queue_before_run_returns() -> None:
    process = Recorder()
    process.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process)
    task = await started(committer)
    calls = [asyncio.create_task(committer.submit(0))]
    await until(lambda: len(process.batches) == 1)
    calls += [asyncio.create_task(committer.submit(n)) for n in range(1, 6)]
    await settle()

    committer.stop()
    await settle()
    assert not task.done()  # still busy with the queue
    process.gate.set()
    await asyncio.wait_for(task, TIMEOUT)

    assert [call.result() for call in calls] == [0, 10, 20, 30, 40, 50]
    assert process.batches == [[0], [1, 2, 3, 4, 5]]


async def test_stop_of_an_idle_committer_returns_at_once() -> None:
    committer: GroupCommitter[int, int] = GroupCommitter("test", Recorder())
    task = await started(committer)
    assert not task.done()
    await stopped(committer, task)


async def test_submit_before_run_is_refused() -> None:
    process = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter("reserve", process)
    with pytest.raises(RuntimeError, match="reserve is not running"):
        await committer.submit(1)
    assert process.batches == []


async def test_submit_after_run_returned_is_refused() -> None:
    committer: GroupCommitter[int, int] = GroupCommitter("test", Recorder())
    task = await started(committer)
    assert await committer.submit(1) == 10
    await stopped(committer, task)
    with pytest.raises(RuntimeError):
        await committer.submit(2)


# -- sweeper --------------------------------------------------------------------------


async def test_a_full_batch_sweeps_again_at_once() -> None:
    acted = [5, 5, 5, 2]
    calls = 0

    async def sweep() -> int:
        nonlocal calls
        calls += 1
        if calls == len(acted):
            sweeper.stop()
        return acted[calls - 1]

    # An hour between cycles: only the full-batch rule can explain four calls.
    sweeper = Sweeper("test", sweep, interval=3600, batch_size=5)
    await asyncio.wait_for(sweeper.run(), TIMEOUT)
    assert calls == 4


async def test_a_partial_batch_waits_for_the_interval() -> None:
    calls = 0

    async def sweep() -> int:
        nonlocal calls
        calls += 1
        return 4

    sweeper = Sweeper("test", sweep, interval=3600, batch_size=5)
    task = asyncio.create_task(sweeper.run())
    await until(lambda: calls == 1)
    await asyncio.sleep(0.05)
    assert calls == 1
    sweeper.stop()
    await asyncio.wait_for(task, TIMEOUT)  # stop cuts the wait short
    assert calls == 1


async def test_the_sweeper_keeps_running_after_a_failed_cycle() -> None:
    outcomes: list[int | Exception] = [ConnectionError("blip"), RuntimeError("again"), 0, 0]
    calls = 0

    async def sweep() -> int:
        nonlocal calls
        calls += 1
        outcome = outcomes[calls - 1]
        if calls == len(outcomes):
            sweeper.stop()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    sweeper = Sweeper("test", sweep, interval=0.001, batch_size=5)
    await asyncio.wait_for(sweeper.run(), TIMEOUT)  # returns normally: nothing escaped
    assert calls == 4


async def test_a_failed_cycle_waits_for_the_interval_before_retrying() -> None:
    calls = 0

    async def sweep() -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError("database down")

    sweeper = Sweeper("test", sweep, interval=3600, batch_size=1)
    task = asyncio.create_task(sweeper.run())
    await until(lambda: calls == 1)
    await asyncio.sleep(0.05)
    assert calls == 1  # no hot loop against a database that is down
    assert not task.done()
    sweeper.stop()
    await asyncio.wait_for(task, TIMEOUT)


async def test_a_sweeper_stopped_before_it_runs_never_sweeps() -> None:
    calls = 0

    async def sweep() -> int:
        nonlocal calls
        calls += 1
        return 0

    sweeper = Sweeper("test", sweep, interval=3600, batch_size=1)
    sweeper.stop()
    await asyncio.wait_for(sweeper.run(), TIMEOUT)
    assert calls == 0


async def test_with_concurrency_two_a_second_batch_runs_while_the_first_is_held() -> None:
    process = Recorder()
    process.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter("test", process, concurrency=2)
    task = await started(committer)
    first = asyncio.create_task(committer.submit(1))
    await until(lambda: len(process.batches) == 1)
    later = [asyncio.create_task(committer.submit(n)) for n in (2, 3)]
    await until(lambda: len(process.batches) == 2)  # not waiting for the first to finish
    third = asyncio.create_task(committer.submit(4))
    await settle()
    assert process.batches == [[1], [2, 3]]  # at most two in flight

    process.gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, *later, third), TIMEOUT) == [
        10, 20, 30, 40,
    ]  # fmt: skip
    assert process.batches == [[1], [2, 3], [4]]
    await stopped(committer, task)
