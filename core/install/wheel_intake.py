"""Every wheel of a resolution becomes a blob: held ones found, the others downloaded once,
checked completely and stored.

Biggest first: the largest wheel's download and check are the longest single steps, so they
should not start last. Downloads and checks have separate bounds (the index is the limit of
one, our CPU of the other); each wheel costs a thread hop each for its download, its check and
storing it (an fsync, outside the check slot). Downloads start biggest first when the index
publishes sizes (pypiserver does not); checks always do, by the size downloaded: on wsci from a
local index every download was done at 0.86 s and the checks (2.2 s of CPU) are the critical
path, which in arrival order ended with scipy checked alone on one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path

from core.install.fetch import FetchedWheel, Fetcher
from core.install.pylock import LockedWheel
from core.state.index_config import RegistrySettings
from core.storage.blobstore import BlobStore
from shared.tree_content import TreeContentPolicy
from shared.wheels import check_identity, inspect_wheel

FETCH_CONCURRENCY = 8  # downloads in flight: the index is the limit, not our CPU
# Wheels checked at once: zlib and hashlib release the GIL, so two threads use both cores;
# more only queue behind them.
CHECK_CONCURRENCY = 2


class WheelIntake:
    def __init__(self, store: BlobStore, work_dir: Path, content: TreeContentPolicy) -> None:
        self._store = store
        self._work_dir = work_dir
        self._content = content  # start-up hooks allowed (shared.tree_content)

    async def obtain(
        self,
        wheels: list[LockedWheel],
        registry: RegistrySettings,
        done: Callable[[], Awaitable[None]],
    ) -> dict[str, tuple[int, str]]:
        """sha256 -> (size, backend) for every wheel; `done` is awaited after each one."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        downloads = Path(tempfile.mkdtemp(prefix="dl-", dir=self._work_dir))
        fetches = asyncio.Semaphore(FETCH_CONCURRENCY)
        checks = LargestFirst(CHECK_CONCURRENCY)
        stored: dict[str, tuple[int, str]] = {}
        try:
            with Fetcher(registry, downloads, FETCH_CONCURRENCY) as fetcher:

                async def one(wheel: LockedWheel) -> None:
                    held = await asyncio.to_thread(self._held, wheel.sha256)
                    if held is None:
                        async with fetches:
                            fetched = await asyncio.to_thread(fetcher.fetch, wheel)
                        async with checks.slot(fetched.size):
                            await asyncio.to_thread(self._check, fetched)
                        # Outside the slot: storing waits on the disk (fsync), not the CPU,
                        # and the next check should not wait for it.
                        held = await asyncio.to_thread(self._store_checked, fetched)
                    stored[wheel.sha256] = held
                    await done()

                ordered = sorted(wheels, key=lambda w: w.size or 0, reverse=True)
                await _gather_all(one(w) for w in ordered)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, downloads, True))
        return stored

    def _held(self, sha256: str) -> tuple[int, str] | None:
        """(Worker thread) (size, backend) of a blob the store already has."""
        backend = self._store.locate(sha256)
        if backend is None:
            return None
        size = self._store.size(sha256)
        return (size, backend) if size is not None else None

    def _check(self, fetched: FetchedWheel) -> None:
        """(Worker thread) Check a downloaded wheel completely; raise UnsafeWheel."""
        wheel = fetched.wheel
        # The index's sha256 was checked while downloading. pip checks no more than that; we
        # check the archive, RECORD, METADATA against the file name, and the name against the
        # resolution: an index must not serve one project or release in place of another.
        info = inspect_wheel(fetched.path, filename=wheel.filename, content=self._content)
        check_identity(info, wheel.name, wheel.version)

    def _store_checked(self, fetched: FetchedWheel) -> tuple[int, str]:
        """(Worker thread) Store a checked wheel; (size, backend)."""
        self._store.put_file(fetched.wheel.sha256, fetched.path)
        return fetched.size, self._store.name


class LargestFirst:
    """A semaphore whose waiters get in biggest `size` first (ties: first come)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, size: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (-size, next(self._order), turn))
            try:
                await turn  # the slot is handed over with the wakeup: _free stays as it is
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # woken and cancelled at once: pass the slot on
                else:
                    self._waiting = [w for w in self._waiting if w[2] is not turn]
                    heapq.heapify(self._waiting)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


async def _gather_all(coros: Iterable[Coroutine[object, object, None]]) -> None:
    """Run every coroutine to its end; then raise the first failure (none is cancelled midway,
    so no worker thread keeps running unobserved)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
