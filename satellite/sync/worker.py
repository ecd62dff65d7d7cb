"""The reconcile worker: one task that serialises reconciles and repairs, newest request first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from satellite.sync.ports import ReconcileDeps, StoreGcReport
from satellite.sync.reconciler import collect_store, collect_trees, reconcile_to_hash, repair_tree
from satellite.sync.results import ReconcileResult

log = logging.getLogger(__name__)


class Reconciler:
    """Serialises reconciles and coalesces requests: the worker always goes for the newest hash.

    `request(h)` only records `h` and wakes the worker, so a burst h1, h2, h3 while a reconcile
    runs ends on h3 with at most one reconcile in between. A run whose hash is no longer the
    newest request stops before its flip (SUPERSEDED), so a stale hash is never made current
    after a newer one was asked for. `request_repair()` queues drift repair of `current`, done
    by the same worker so it never races a reconcile. `request_gc()` queues a GC pass and
    nothing else (the agent's timers: a tree retired while a run pinned it goes once unpinned;
    `store=True` also collects blobs/ and pkgs/, and tells `on_store_gc` what it did; the pass
    after a flip is in the reconcile's result instead).

    The worker ends only when shut down or when it dies of an error a reconcile does not catch
    (reading `current` failed, say): then `start()`'s task holds that error, `wait_idle()`
    raises it and `shutdown()` re-raises it, so it is never lost.
    """

    def __init__(
        self,
        deps: ReconcileDeps,
        on_result: Callable[[ReconcileResult], None] | None = None,
        on_store_gc: Callable[[StoreGcReport], None] | None = None,
    ) -> None:
        self._deps = deps
        self._on_result = on_result
        self._on_store_gc = on_store_gc
        self._desired: str | None = None
        self._requested = 0  # generation of the newest request
        self._handled = 0  # generation the worker has finished
        self._repair = False
        self._reconcile = False  # a reconcile (or repair) was asked for, not only a GC pass
        self._gc = False
        self._store_gc = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.last_result: ReconcileResult | None = None

    @property
    def desired(self) -> str | None:
        return self._desired

    def request(self, lockfile_hash: str | None) -> None:
        """Make `lockfile_hash` the target ("": nothing desired); never blocks.

        None changes nothing but re-runs the current target (a cheap no-op when `current`
        already names it): what a drift watcher wants after `current` broke.
        """
        if lockfile_hash is not None:
            self._desired = lockfile_hash
        self._reconcile = True
        self._requested += 1
        self._wake.set()

    def request_repair(self) -> None:
        self._repair = True
        self._reconcile = True
        self._requested += 1
        self._wake.set()

    def request_gc(self, store: bool = False) -> None:
        """Queue a housekeeping pass, without a reconcile or a report: tree GC (grace and pins
        as always), then with `store` store GC when enabled. Run by this worker, between
        reconciles, so it never races one that is about to use a blob or package."""
        self._gc = True
        self._store_gc = self._store_gc or store
        self._requested += 1
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        """Start the worker (idempotent); its task ends only with shutdown() or an error."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="spk-reconciler")
        return self._task

    async def run(self) -> None:
        """The worker loop; runs until cancelled (see shutdown)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            generation = self._requested
            if self._repair:
                self._repair = False
                await self._repair_current()
            reconcile, self._reconcile = self._reconcile, False
            target = self._desired
            if target is not None and reconcile:

                def still_wanted(wanted: str = target) -> bool:
                    return self._desired == wanted

                result = await reconcile_to_hash(target, self._deps, still_wanted)
                self._publish(result)
            if self._gc:
                store, self._gc, self._store_gc = self._store_gc, False, False
                if not reconcile:  # a reconcile runs the same tree GC after its flip
                    await collect_trees(self._deps)
                report = await collect_store(self._deps) if store else None
                if report is not None and self._on_store_gc is not None:
                    try:
                        self._on_store_gc(report)
                    except Exception:
                        log.exception("store GC callback failed")
            async with self._idle:
                self._handled = generation
                self._idle.notify_all()

    async def _repair_current(self) -> None:
        current = await self._deps.trees.current_hash()
        if current is not None:
            self._publish(await repair_tree(current, self._deps))
        # A missing or dangling `current` needs no repair: the reconcile that follows
        # rebuilds the desired tree because `current` no longer names it.

    def _publish(self, result: ReconcileResult) -> None:
        self.last_result = result
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("reconcile result callback failed")

    async def wait_idle(self) -> ReconcileResult | None:
        """Wait until every request made so far has been handled; the last result.

        Raises the worker's error if it dies first, instead of waiting for it forever.
        """
        wanted = self._requested
        idle = asyncio.ensure_future(self._handled_up_to(wanted))
        task = self._task
        try:
            waiting = {idle} if task is None else {idle, task}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
        if idle.done() and not idle.cancelled():
            return self.last_result
        assert task is not None and task.done()
        if task.cancelled():
            raise RuntimeError("the reconciler was shut down before it was idle")
        task.result()  # raises what the worker died of
        raise RuntimeError("the reconciler worker ended")  # pragma: no cover -- run() loops

    async def _handled_up_to(self, generation: int) -> None:
        async with self._idle:
            await self._idle.wait_for(lambda: self._handled >= generation)

    async def shutdown(self) -> None:
        """Stop the worker (idempotent). A reconcile in flight is cancelled: partial downloads
        are kept for resume and unfinished builds are removed by the next cleanup_temp(). If
        the worker had died of an error, that error is raised here."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Reconciler:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
