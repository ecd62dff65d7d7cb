"""Retrying a failed sync on its own: a jittered timer per failure, cancelled by any newer result.

Without this the agent waited for the next hash or reconnect after a failure (a full disk that
got freed, a core that came back with the blob): docs/reliability.md, fault 4.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Protocol

from satellite.backoff import Backoff
from satellite.sync.results import Outcome, ReconcileResult

log = logging.getLogger(__name__)


class Requests(Protocol):
    """What a retry asks of the reconcile worker (satellite.sync.Reconciler)."""

    def request(self, lockfile_hash: str | None) -> None: ...
    def request_repair(self) -> None: ...


class SyncRetry:
    """Feed it every result (`on_result`); after a failure it asks `worker` again later."""

    def __init__(self, worker: Requests, backoff: Backoff) -> None:
        self.backoff = backoff  # reset by a success; the delay doubles per failure up to its cap
        self._worker = worker
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        """Whether a retry is scheduled."""
        return self._timer is not None

    def on_result(self, result: ReconcileResult) -> None:
        """Any result supersedes a scheduled retry; a failure schedules the next one."""
        self.cancel()
        if result.ok:
            if result.outcome is not Outcome.SUPERSEDED:
                self.backoff.reset()
            return
        callback: Callable[[], None]
        if result.drift_repair:
            callback = self._worker.request_repair
        else:
            callback = functools.partial(self._worker.request, None)  # the desired hash again
        delay = self.backoff.next_delay()
        log.info("retrying the failed sync in %.1f s", delay)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire, callback)

    def _fire(self, callback: Callable[[], None]) -> None:
        self._timer = None
        callback()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
