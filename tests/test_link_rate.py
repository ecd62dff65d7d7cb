"""How long a sync lets the core compute patches: the pure link-rate rules."""

from __future__ import annotations

from satellite.sync.link_rate import (
    MIN_SAMPLE_BYTES,
    WAIT_SHARE,
    PullClock,
    patch_wait_ms,
    updated_rate,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_pulls_count_their_wall_time_once() -> None:
    clock = Clock()
    pulls = PullClock(clock)
    with pulls.pulling():
        clock.now = 1.0
        with pulls.pulling():  # a second pull shares the link from t=1 to t=3
            clock.now = 3.0
        clock.now = 4.0
    clock.now = 10.0  # idle: unpacking, say
    with pulls.pulling():
        clock.now = 11.0
    assert pulls.busy_seconds == 5.0


def test_the_rate_is_smoothed_and_small_pulls_are_no_sample() -> None:
    assert updated_rate(0.0, 100, 1.0) == 0.0  # latency, not bandwidth
    assert updated_rate(0.0, MIN_SAMPLE_BYTES, 0.0) == 0.0
    first = updated_rate(0.0, 8 * MIN_SAMPLE_BYTES, 2.0)
    assert first == 4 * MIN_SAMPLE_BYTES
    second = updated_rate(first, 16 * MIN_SAMPLE_BYTES, 1.0)
    assert first < second < 16 * MIN_SAMPLE_BYTES
    assert updated_rate(second, 10, 1.0) == second


def test_the_wait_is_a_share_of_the_whole_wheels_time_on_this_link() -> None:
    assert patch_wait_ms(0.0, 10**9) is None  # not measured: the core's own default
    fast, slow = 125e6, 1.25e6  # 1 Gbit/s, 10 Mbit/s
    assert patch_wait_ms(fast, 6_000_000) == int(1000 * WAIT_SHARE * 6_000_000 / fast)  # 24 ms
    assert patch_wait_ms(slow, 6_000_000) == 2400
    assert patch_wait_ms(1.0, 10**12) == 3_600_000  # bounded
