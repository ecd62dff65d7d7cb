"""How fast this satellite pulls blobs, and so how long a sync may wait for a patch.

A patch is only worth waiting for while it can still beat the whole wheels: waiting W and then
pulling a patch of P bytes wins over pulling the B bytes of wheels only while W < (B - P)/rate.
On a slow link (a branch office, a metered uplink) that is seconds and the core's patch (often
a tenth of the wheel) saves most of them; on a fast one it is milliseconds. Waiting the core's
full --delta-wait-seconds regardless cost a 1 Gbit/s host 2.2 s on a one-pin change of wsci
(sympy's patch took the core 2.2 s to compute; the wheel arrives in 30 ms; docs/deltas.md).

The rate is measured on the pulls themselves: the bytes of one sync over the wall time during
which at least one pull was running (concurrent pulls share the link, so per-blob rates would
understate it). It is smoothed across syncs and kept in the agent's state, so a restarted agent
still knows its link. Pure: the caller supplies the clock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

MIN_SAMPLE_BYTES = 1024 * 1024  # below this a pull is latency, not bandwidth: no sample
SMOOTHING = 0.5  # weight of the newest sample
WAIT_SHARE = 0.5  # of the whole wheels' pull time: patches are rarely under half the wheel's
MAX_WAIT_MS = 3_600_000  # the wire field's sanity bound; the core caps it far lower anyway


class PullClock:
    """Busy time of one sync's pulls: wall time during which at least one pull was running."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._now = monotonic
        self._active = 0
        self._since = 0.0
        self.busy_seconds = 0.0

    @contextlib.contextmanager
    def pulling(self) -> Iterator[None]:
        if self._active == 0:
            self._since = self._now()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self.busy_seconds += self._now() - self._since


def updated_rate(previous: float, pulled_bytes: int, busy_seconds: float) -> float:
    """The smoothed pull rate (bytes/s) after one sync; `previous` 0 means none measured yet."""
    if pulled_bytes < MIN_SAMPLE_BYTES or busy_seconds <= 0:
        return previous
    sample = pulled_bytes / busy_seconds
    if previous <= 0:
        return sample
    return SMOOTHING * sample + (1 - SMOOTHING) * previous


def patch_wait_ms(rate: float, wheel_bytes: int) -> int | None:
    """How long to let the core compute patches for `wheel_bytes` of wheels; None (the core's
    own default) while this satellite has not measured its link."""
    if rate <= 0:
        return None
    return min(MAX_WAIT_MS, int(1000 * WAIT_SHARE * wheel_bytes / rate))
