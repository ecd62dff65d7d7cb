"""The allowlist resolved for every environment of an install.

    resolve_all()   one wheel list per environment, in the environments' order

One environment: one uv run for it (core/install/uv_resolver.py), as always.

Several: one universal uv run, and each environment's wheels picked from its lockfile
(core/install/universal.py). On w31 that is one 0.3-0.4 s run where four environments cost
one cold run and three warm ones (figure 6). Where the universal lockfile does not answer for
an environment (uv cannot resolve every platform at once, a marker we cannot evaluate, a
package without a wheel for it), the install resolves per environment instead: the first
alone, then the others at once on uv's cache, warm by then. That path is also the one that
explains a refusal from the index (core/install/diagnosis.py), naming the environment and the
package, so an install that cannot succeed is told exactly why.

A universal resolution picks one version of a dependency for the whole fleet where one fits
(uv forks only where the environments need different ones), where a run per environment picks
the newest for each: a dependency may come out older than a per-environment run would choose,
never outside its requirements.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.install.diagnosis import resolve_or_explain
from core.install.install_state import EnvProgress
from core.install.pylock import LockedWheel
from core.install.universal import fleet_marker, select_wheels
from core.install.uv_resolver import clean_pins, resolve_universal
from core.state.index_config import RegistrySettings
from shared.environments import Environment
from shared.errors import ResolveError, SpkError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Run:
    """What every resolver run of one install shares."""

    registry: RegistrySettings
    envs: Sequence[Environment]
    native: str
    work_dir: Path
    cache_dir: Path
    progress: Sequence[EnvProgress]
    report: Callable[[], Awaitable[object]]

    async def mark(self, status: str, *rows: EnvProgress) -> None:
        """Moves these rows (all when none are named) to `status`, and records it, so
        GetInstallState and WatchInstall show each environment's step while it runs."""
        for p in rows or self.progress:
            p.status = status
        await self.report()


async def resolve_all(
    reqs: Sequence[tuple[str, str]],
    registry: RegistrySettings,
    envs: Sequence[Environment],
    native: str,
    work_dir: Path,
    cache_dir: Path,
    progress: Sequence[EnvProgress],
    report: Callable[[], Awaitable[object]],
) -> list[list[LockedWheel]]:
    """Every environment's wheels; the first failure (in list order) fails the install and is
    recorded on its environment's progress row. `report` records the rows whenever an
    environment moves on."""
    pins = clean_pins(reqs)  # a bad pin is refused before any resolver runs
    if not pins:  # an empty allowlist needs no resolver and no scratch dir
        return [[] for _ in envs]
    run = _Run(registry, envs, native, work_dir, cache_dir, progress, report)
    if len(envs) > 1 and (locks := await _universal(run, pins)) is not None:
        return locks
    return await _each_on_its_own(run, pins)


async def _universal(run: _Run, pins: list[tuple[str, str]]) -> list[list[LockedWheel]] | None:
    """One uv run for every environment, each one's wheels picked from it; None when the
    lockfile does not answer (the reason is logged)."""
    await run.mark("resolving")
    try:
        marker = fleet_marker(run.envs, run.native)
        packages = await resolve_universal(
            pins, run.registry, run.envs, marker, run.work_dir, cache_dir=run.cache_dir
        )
        requested = {name for name, _ in pins}
        locks = [select_wheels(env, run.native, packages, requested) for env in run.envs]
    except ResolveError as exc:  # a timeout (RegistryError) is not retried per environment
        # A warning: the operator learns why installs take the slower path (often an index
        # that lacks another platform's dependency).
        log.warning("resolving each environment on its own: %s", exc.message)
        return None
    await run.mark("fetching")
    log.info("resolved %d environments in one universal resolution", len(run.envs))
    return locks


async def _each_on_its_own(run: _Run, pins: list[tuple[str, str]]) -> list[list[LockedWheel]]:
    """The first environment alone, then every other at once. uv's cache (index pages, wheel
    metadata) is shared, and after one run it is warm: on w31 a further environment then
    resolved in 0.11-0.15 s against 0.21-0.39 s cold, while four cold runs at once took 0.75 s
    on 2 cores."""
    envs, progress = run.envs, run.progress

    async def one(env: Environment, p: EnvProgress) -> list[LockedWheel]:
        await run.mark("resolving", p)
        wheels = await resolve_or_explain(
            pins, run.registry, env, run.native, run.work_dir, cache_dir=run.cache_dir
        )
        await run.mark("fetching", p)
        return wheels

    await run.mark("pending")
    if not envs:
        return []
    tasks = [asyncio.create_task(one(envs[0], progress[0]))]
    try:
        await asyncio.wait(tasks)
        if not tasks[0].cancelled() and tasks[0].exception() is None:
            pairs = zip(envs[1:], progress[1:], strict=True)
            tasks += [asyncio.create_task(one(e, p)) for e, p in pairs]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    # Environments after a failed first one never started: they stay pending.
    for p, result in zip(progress[: len(results)], results, strict=True):
        if isinstance(result, SpkError):
            p.status, p.error = "error", result.message
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    return [r for r in results if isinstance(r, list)]
