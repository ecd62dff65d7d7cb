"""core/install/wheel_intake.py LargestFirst: the check slots go to the biggest waiting wheel."""

from __future__ import annotations

import asyncio

import pytest

from core.install.wheel_intake import LargestFirst


async def _holder(gate: LargestFirst, size: int, order: list[int], release: asyncio.Event) -> None:
    async with gate.slot(size):
        order.append(size)
        await release.wait()


async def test_waiters_get_in_biggest_first() -> None:
    gate = LargestFirst(1)
    order: list[int] = []
    release = asyncio.Event()
    release.set()
    first = asyncio.Event()
    holding = asyncio.create_task(_holder(gate, 1, order, first))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(_holder(gate, s, order, release)) for s in (5, 50, 10, 50)]
    await asyncio.sleep(0)
    first.set()
    await asyncio.gather(holding, *waiters)
    assert order == [1, 50, 50, 10, 5]
    # All slots came back: a new comer gets in at once.
    async with gate.slot(0):
        pass


async def test_a_cancelled_waiter_loses_its_place_not_the_slot() -> None:
    gate = LargestFirst(1)
    order: list[int] = []
    go = asyncio.Event()
    holding = asyncio.create_task(_holder(gate, 1, order, go))
    await asyncio.sleep(0)
    big = asyncio.create_task(_holder(gate, 99, order, go))
    small = asyncio.create_task(_holder(gate, 2, order, go))
    await asyncio.sleep(0)
    big.cancel()
    go.set()
    await asyncio.gather(holding, small)
    with pytest.raises(asyncio.CancelledError):
        await big
    assert order == [1, 2]


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_slot_on() -> None:
    gate = LargestFirst(1)
    order: list[int] = []
    go = asyncio.Event()
    go.set()
    held = gate.slot(1)
    await held.__aenter__()
    woken = asyncio.create_task(_holder(gate, 50, order, go))
    after = asyncio.create_task(_holder(gate, 5, order, go))
    await asyncio.sleep(0)
    await held.__aexit__(None, None, None)  # hands the slot to `woken`, which has not run ...
    woken.cancel()  # ... and is cancelled before it does
    await after
    with pytest.raises(asyncio.CancelledError):
        await woken
    assert order == [5]
    async with gate.slot(0):
        pass
