"""The agent's lifecycle, assembled from fakes (tests/fakes.py) through its public constructor.

The gRPC client, the file-system store and watchdog have their own tests; here the agent is what
is under test: it feeds the worker from the refresh stream, retries failed syncs, pins a key on
trust-on-first-use, runs its drift watcher, and ends (loudly) when its worker dies.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from satellite import cli
from satellite.agent import Agent, AgentConfig, Watcher
from satellite.drift import DriftWatcher, ObserverLike
from satellite.store import SatelliteStore
from satellite.sync import Outcome, Reconciler
from shared.errors import SpkError
from tests.core_process import eventually_async
from tests.fakes import FakeCore, MemoryStore, fake_package, manifest_of


def _agent(
    core: FakeCore,
    store: MemoryStore,
    watch: Callable[[Reconciler], Watcher] | None = None,
    **config: Any,
) -> Agent:
    settings: dict[str, Any] = {
        "signing_key_pem": core.public_pem,
        "backoff_base": 0.01,
        "retry_base": 0.01,
        "retry_cap": 0.02,
        "unpack_concurrency": 2,
    }
    settings.update(config)
    return Agent(AgentConfig("core.invalid:1", "t", **settings), store, lambda: core, watch)


async def test_the_agent_syncs_what_the_stream_asks_for() -> None:
    core, store = FakeCore(), MemoryStore()
    a = fake_package("alpha", "1.0")
    manifest = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    async with _agent(core, store) as agent:
        core.desire(manifest.lockfile_hash)
        result = await agent.wait_synced(manifest.lockfile_hash, within=10)
        assert result.outcome is Outcome.FLIPPED
        assert agent.connected.is_set() and agent.running and store.locked
    assert store.current == manifest.lockfile_hash
    assert core.subscriptions == [""]  # subscribed once, with nothing current yet
    assert core.closed and not store.locked and not agent.running


async def test_an_unserved_host_keeps_its_tree_until_an_environment_serves_it() -> None:
    core, store = FakeCore(), MemoryStore()
    a, b = fake_package("alpha", "1.0"), fake_package("alpha", "2.0")
    first = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    second = core.publish(manifest_of([b[0]], sequence=2), {b[0].sha256: b[1]})
    async with _agent(core, store) as agent:
        core.desire(first.lockfile_hash)
        await agent.wait_synced(first.lockfile_hash, within=10)
        core.refuse("no environment fits cp313-manylinux_2_36_aarch64; add one with: ...")
        await eventually_async(lambda: agent.unserved != "")
        state = await store.load_state()
        assert state.status == "unserved" and state.error.startswith("no environment fits")
        assert state.desired_hash == first.lockfile_hash  # runs keep resolving to its tree
        assert store.current == first.lockfile_hash and agent.environment == ""
        core.desire(second.lockfile_hash)  # an environment was added and installed
        await agent.wait_synced(second.lockfile_hash, within=10)
        assert agent.unserved == ""
    assert store.current == second.lockfile_hash


async def test_a_failed_sync_is_retried_without_a_new_hash() -> None:
    core, store = FakeCore(), MemoryStore()
    a = fake_package("alpha", "1.0")
    manifest = manifest_of([a[0]])
    async with _agent(core, store) as agent:
        core.desire(manifest.lockfile_hash)  # not published yet: the sync fails
        await eventually_async(lambda: agent.last_result and not agent.last_result.ok)
        core.publish(manifest, {a[0].sha256: a[1]})  # the core has it now
        await agent.wait_synced(manifest.lockfile_hash, within=10)
    assert core.manifest_calls[:2] == [manifest.lockfile_hash] * 2
    assert core.subscriptions == [""]  # the retry needed no new hash nor a reconnect


async def test_trust_on_first_use_pins_the_key() -> None:
    core, store = FakeCore(), MemoryStore()
    a = fake_package("alpha", "1.0")
    manifest = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    async with _agent(core, store, signing_key_pem=None, trust_on_first_use=True) as agent:
        core.desire(manifest.lockfile_hash)
        await agent.wait_synced(manifest.lockfile_hash, within=10)
    assert store.pinned_key == core.public_pem


async def test_without_a_key_the_agent_refuses_to_start() -> None:
    core, store = FakeCore(), MemoryStore()
    agent = _agent(core, store, signing_key_pem=None)
    with pytest.raises(SpkError, match="no signing key"):
        await agent.run()
    assert core.closed and not store.locked


async def test_a_dead_reconcile_worker_ends_the_agent_with_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core, store = FakeCore(), MemoryStore()
    a = fake_package("alpha", "1.0")
    manifest = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    agent = _agent(core, store)
    task = agent.start()
    await eventually_async(lambda: core.subscriptions)  # the stream is up
    store.fail["current_hash"] = RuntimeError("the store is gone")  # what the worker reads first
    core.desire(manifest.lockfile_hash)
    with pytest.raises(RuntimeError, match="the store is gone"):
        await asyncio.wait_for(task, 10)
    assert not agent.running and core.closed and not store.locked
    died = [r for r in caplog.records if "reconcile worker died" in r.getMessage()]
    assert len(died) == 1 and died[0].levelno == logging.ERROR and died[0].exc_info
    with pytest.raises(RuntimeError, match="the store is gone"):
        await agent.shutdown()  # the error stays with the agent's task
    await agent.shutdown()  # idempotent


class _GoneForTheWorker(MemoryStore):
    """A store that answers the stream's first look at `current` and fails every later one."""

    async def current_hash(self) -> str | None:
        if self.calls.count("current_hash") >= 1:
            raise RuntimeError("the store is gone")
        return await super().current_hash()


def test_the_cli_exits_non_zero_when_the_worker_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = FakeCore()
    a = fake_package("alpha", "1.0")
    manifest = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    (tmp_path / "token").write_text("t\n")
    (tmp_path / "key.pem").write_text(core.public_pem)

    def from_config(config: AgentConfig, metrics: object = None) -> Agent:
        core.desire(manifest.lockfile_hash)
        return Agent(config, _GoneForTheWorker(), lambda: core)

    monkeypatch.setattr(Agent, "from_config", from_config)
    argv = ["agent", "--core", "127.0.0.1:1", "--token-file", str(tmp_path / "token")]
    argv += ["--signing-key", str(tmp_path / "key.pem"), "--no-drift-watch"]
    assert cli.main(argv) == 1
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 1 and "reconcile worker died" in traced[0].getMessage()


class _RecordingWatcher:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")


async def test_the_drift_watcher_runs_for_the_agents_lifetime() -> None:
    core, store = FakeCore(), MemoryStore()
    events: list[str] = []
    workers: list[Reconciler] = []

    def watch(reconciler: Reconciler) -> Watcher:
        workers.append(reconciler)
        return _RecordingWatcher(events)

    async with _agent(core, store, watch) as agent:
        await eventually_async(lambda: core.subscriptions)
        assert events == ["start"] and agent.running
    assert events == ["start", "stop"] and len(workers) == 1


class _NoInotifyLeft:
    """An Observer on a host whose inotify limits are used up, as watchdog reports it."""

    daemon = False

    def __init__(self, errno_: int, message: str) -> None:
        self._error = OSError(errno_, message)
        self.stopped = False

    def schedule(
        self, handler: object, path: str, *, recursive: bool, event_filter: object = None
    ) -> object:
        raise self._error

    def unschedule(self, watch: object) -> None:
        raise AssertionError("not reached")

    def start(self) -> None:
        raise AssertionError("not reached")

    def stop(self) -> None:
        self.stopped = True

    def join(self, timeout: float | None = None) -> None:
        return None


@pytest.mark.parametrize(
    ("errno_", "message", "sysctl"),
    [
        (errno.EMFILE, "inotify instance limit reached", "fs.inotify.max_user_instances"),
        (errno.ENOSPC, "inotify watch limit reached", "fs.inotify.max_user_watches"),
    ],
)
async def test_an_inotify_limit_turns_drift_repair_off_and_the_agent_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, errno_: int, message: str, sysctl: str
) -> None:
    core, store = FakeCore(), MemoryStore()
    observers: list[_NoInotifyLeft] = []
    watchers: list[DriftWatcher] = []

    def observer() -> ObserverLike:
        observers.append(_NoInotifyLeft(errno_, message))
        return observers[-1]

    def watch(reconciler: Reconciler) -> Watcher:
        watchers.append(DriftWatcher(SatelliteStore(tmp_path), reconciler, observer))
        return watchers[-1]

    a = fake_package("alpha", "1.0")
    manifest = core.publish(manifest_of([a[0]]), {a[0].sha256: a[1]})
    async with _agent(core, store, watch) as agent:
        core.desire(manifest.lockfile_hash)
        await agent.wait_synced(manifest.lockfile_hash, within=10)
        assert agent.running and not watchers[0].active
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    off = [w for w in warnings if "drift repair is off" in w]
    assert len(off) == 1 and sysctl in off[0] and message in off[0]
    assert observers[0].stopped  # whatever it had started is released
