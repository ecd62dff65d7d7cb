"""The fan-out hub: a latest-value slot per subscriber, never a growing queue."""

from __future__ import annotations

import asyncio

from core.fanout.hub import Hub


async def _take(agen, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    return [await asyncio.wait_for(agen.__anext__(), 1) for _ in range(n)]


async def test_first_value_at_once_then_changes() -> None:
    hub = Hub("h0")
    values = hub.subscribe("sat").values()
    assert await _take(values, 1) == ["h0"]
    hub.publish("h1")
    assert await _take(values, 1) == ["h1"]
    await values.aclose()
    assert hub.subscriber_count() == 0


async def test_slow_subscriber_sees_only_the_newest() -> None:
    hub = Hub("h0")
    values = hub.subscribe("sat").values()
    assert await _take(values, 1) == ["h0"]
    for i in range(1, 1000):
        hub.publish(f"h{i}")
    assert await _take(values, 1) == ["h999"]
    # Nothing queued behind it.
    try:
        await asyncio.wait_for(values.__anext__(), 0.05)
        raise AssertionError("a stale value was queued")
    except TimeoutError:
        pass


async def test_republishing_the_same_value_sends_nothing() -> None:
    hub = Hub("h0")
    values = hub.subscribe("sat").values()
    await _take(values, 1)
    hub.publish("h0")
    try:
        await asyncio.wait_for(values.__anext__(), 0.05)
        raise AssertionError("duplicate value sent")
    except TimeoutError:
        pass


async def test_close_key_ends_streams_and_marks_revoked() -> None:
    hub = Hub("h0")
    sub_a, sub_b = hub.subscribe("sat"), hub.subscribe("other")
    a, b = sub_a.values(), sub_b.values()
    await _take(a, 1)
    await _take(b, 1)
    assert hub.is_connected("sat")
    hub.close_key("sat")
    try:
        await asyncio.wait_for(a.__anext__(), 1)
        raise AssertionError("stream should have ended")
    except StopAsyncIteration:
        pass
    assert sub_a.revoked and not hub.is_connected("sat")
    hub.publish("h1")
    assert await _take(b, 1) == ["h1"]
    hub.close_all()
    assert not sub_b.revoked
