"""Calls that ask for the same blocking step at once are answered by one run of it (issue 20: the long polls'
looks after a change of work, and their touches of the silo rows)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from coordinator.coalescer import Coalescer
from coordinator.offload import Offload


class Squares:
    """A batch function that records its batches; the first one blocks until released, so the asks made
    meanwhile queue behind it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        if not self.started.is_set():
            self.started.set()
            self.release.wait(timeout=30)
        self.batches.append(list(items))
        return [ValueError(f"no square of {item}") if item < 0 else item * item for item in items]


def test_asks_made_while_a_batch_runs_share_the_next_one() -> None:
    offload, squares = Offload(4), Squares()
    coalescer = Coalescer(offload, squares)

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(coalescer.ask(1))
        await _started(squares)
        rest = [asyncio.ensure_future(coalescer.ask(item)) for item in range(2, 52)]
        await asyncio.sleep(0)
        squares.release.set()
        return list(await asyncio.gather(first, *rest))

    try:
        assert asyncio.run(scenario()) == [item * item for item in range(1, 52)]
    finally:
        offload.shutdown()
    assert squares.batches == [[1], list(range(2, 52))]


def test_an_item_that_fails_alone_fails_only_its_call_and_a_cancelled_call_not_the_others() -> None:
    offload, squares = Offload(4), Squares()
    coalescer = Coalescer(offload, squares)

    async def scenario() -> tuple[int, int]:
        blocker = asyncio.ensure_future(coalescer.ask(0))
        await _started(squares)
        good, bad, gone = (asyncio.ensure_future(coalescer.ask(item)) for item in (3, -1, 4))
        await asyncio.sleep(0)
        gone.cancel()
        squares.release.set()
        with pytest.raises(ValueError, match="no square of -1"):
            await bad
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await blocker, await good

    try:
        assert asyncio.run(scenario()) == (0, 9)
    finally:
        offload.shutdown()
    assert squares.batches == [[0], [3, -1, 4]]


async def _started(squares: Squares) -> None:
    """Until the first batch is running on the pool (blocked in it)."""
    while not squares.started.is_set():
        await asyncio.sleep(0.001)
