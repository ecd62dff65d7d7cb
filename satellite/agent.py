"""The agent's lifecycle: hold the refresh stream open, feed the reconciler, reconnect with backoff.

    async with Agent.from_config(config) as agent:   # or: await Agent.from_config(config).run()
        ...                                          # agent.shutdown() is idempotent

An Agent is assembled from injected parts: its data dir (an AgentStore; satellite.store.AsyncStore
for real), a way to connect to the core (a CoreConnection; satellite.client.GrpcCoreClient), an
optional drift watcher factory (satellite.drift.DriftWatcher) and a clock. `from_config` builds the
real ones; tests pass fakes (tests/fakes.py). No module-level state: many agents can share one
process (the fan-out benchmark hosts hundreds).

A worker that dies ends the agent: if the reconcile worker fails with an error it does not catch,
`run()` stops the refresh stream (which would otherwise feed hashes to nobody), logs the error
with its traceback and raises it, so the CLI exits non-zero and a supervisor restarts the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from satellite.backoff import Backoff
from satellite.client import ClientConfig, GrpcCoreClient
from satellite.drift import DriftWatcher
from satellite.http_blobs import HttpBlobs
from satellite.metrics import AgentMetrics
from satellite.retry import SyncRetry
from satellite.store import AsyncStore, SatelliteStore
from satellite.store.usage import DiskUsage, disk_usage
from satellite.sync import (
    DEFAULT_MAX_WINDOW_LOG,
    DEFAULT_TREE_GRACE_SECONDS,
    BlobSource,
    Desired,
    Outcome,
    PackageStore,
    ReconcileDeps,
    Reconciler,
    ReconcileResult,
    StateStore,
    StoreGcPolicy,
    StoreGcReport,
    TreeStore,
    UrlSource,
)
from shared import tags
from shared.errors import IntegrityError, SpkError, Unauthenticated
from shared.logs import fields
from shared.manifest import Manifest
from shared.signing import (
    key_id,
    load_public_key_pem,
    load_public_keys_pem,
    verify_manifest_any,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Parsed once at the edge (CLI) and passed in."""

    core: str  # host:port
    token: str = field(repr=False)
    data_dir: Path = Path("spk-satellite-data")
    signing_key_pem: str | None = None  # the core's public key(s), pinned; several PEM blocks ok
    trust_on_first_use: bool = False  # fetch and pin the key on first contact (opt-in)
    ca_certificates: bytes | None = None  # TLS when set
    client_cert: bytes | None = None  # mTLS
    client_key: bytes | None = field(default=None, repr=False)
    tree_grace_seconds: float = DEFAULT_TREE_GRACE_SECONDS
    watch_drift: bool = True
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    pull_concurrency: int = 4
    # Unpacking is CPU and disk bound (zlib, hashing and file I/O release the GIL): every core.
    unpack_concurrency: int = field(default_factory=lambda: os.cpu_count() or 2)
    # A failed sync is retried on its own after a jittered delay that doubles up to the cap (a
    # full disk gets freed, a core comes back with the blob): without this the agent waited for
    # the next hash or reconnect (docs/reliability.md, fault 4).
    retry_base: float = 2.0
    retry_cap: float = 300.0
    # Blob bytes without the core: use the URLs the core hands out (presigned, CDN), or this
    # host's own mirror of the blob store; every byte is verified and any failure falls back.
    blob_urls: bool = True
    blob_base_url: str = ""
    # Binary deltas: ask the core for patches from wheels held here (False: whole wheels, as
    # before GetDeltas); the largest zstd window (2**N bytes of memory) a patch may ask for.
    deltas: bool = True
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG
    delta_wait_seconds: float | None = None  # None: by the measured link (sync/link_rate.py)
    # GC of blobs/ and pkgs/ after each flip and every store_gc.interval_seconds.
    store_gc: StoreGcPolicy = field(default_factory=StoreGcPolicy)
    # Tree GC also runs on this timer, not only after a flip: a superseded tree that a script
    # run had pinned (or that was inside its grace) goes without waiting for the next release.
    tree_gc_interval: float = 60.0


class CoreConnection(BlobSource, Protocol):
    """What the agent needs from the core: a reconcile's BlobSource, plus the refresh stream,
    the signing key (trust on first use) and a close. The gRPC adapter: satellite/client.py."""

    def subscribe(self, current_hash: str) -> AsyncIterator[Desired]:
        """What is desired: the first at once, then one per change. Ends or raises on loss."""
        ...

    async def signing_key_pem(self) -> str: ...
    async def close(self) -> None: ...


class AgentStore(PackageStore, TreeStore, StateStore, Protocol):
    """The agent's data dir: the sync logic's three stores, plus its lock, the cleanup of an
    earlier run's leftovers and the pinned signing key (satellite.store.AsyncStore)."""

    def agent_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held for the agent's whole run; a second agent on the same dir gets StoreError."""
        ...

    async def cleanup_temp(self) -> int:
        """Remove unfinished builds of an earlier run; how many entries went."""
        ...

    async def read_pinned_key(self) -> str | None: ...
    async def pin_key(self, pem: str) -> None: ...


class Watcher(Protocol):
    """A drift watcher (satellite.drift.DriftWatcher): started after the worker, stopped first."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


WatcherFactory = Callable[[Reconciler], Watcher]


class UrlClient(UrlSource, Protocol):
    """A UrlSource the agent opens per run and closes after (satellite.http_blobs.HttpBlobs)."""

    async def close(self) -> None: ...


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        store: AgentStore,
        connect: Callable[[], CoreConnection],
        watch_drift: WatcherFactory | None = None,
        clock: Callable[[], float] = time.time,
        urls: Callable[[], UrlClient] | None = None,
        metrics: AgentMetrics | None = None,
        measure_disk: Callable[[], Awaitable[DiskUsage]] | None = None,
    ) -> None:
        """`connect` is called once per run; `watch_drift` None runs without drift repair;
        `clock` is the wall clock for tree retirement and GC; `urls` opens the HTTP client for
        blob URLs (None: every blob comes through the core); `metrics` (satellite/metrics.py)
        is counted into when given, with `measure_disk` for the data dir's size."""
        self.config = config
        self.metrics = metrics
        self._measure_disk = measure_disk
        self._measuring: asyncio.Task[None] | None = None
        self._sequences: dict[str, int] = {}  # lockfile hash -> release sequence, as offered
        # Set once the data dir is locked and cleaned: the agent is up (sd_notify READY=1).
        self.started = asyncio.Event()
        # Told every result after it is counted (the CLI shows it as systemd's STATUS=).
        self.on_result: Callable[[ReconcileResult], None] | None = None
        self.store = store
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.environment = ""  # the core's environment serving this host
        self.unserved = ""  # why none does, while none does
        self.last_result: ReconcileResult | None = None
        # What the reconcile worker died of, logged with its traceback already; run() raises it.
        self.worker_error: BaseException | None = None
        self._connect = connect
        self._urls = urls
        self._watch_drift = watch_drift
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._retry: SyncRetry | None = None

    @classmethod
    def from_config(cls, config: AgentConfig, metrics: AgentMetrics | None = None) -> Agent:
        """The real agent: the data dir on disk, gRPC to the core, watchdog for drift."""
        disk = SatelliteStore(config.data_dir.absolute())
        client_config = ClientConfig(
            config.core, config.token, config.ca_certificates, config.client_cert, config.client_key
        )

        def connect() -> CoreConnection:
            return GrpcCoreClient(client_config)

        def watch(reconciler: Reconciler) -> Watcher:
            return DriftWatcher(disk, reconciler)

        async def measure() -> DiskUsage:
            return await asyncio.to_thread(disk_usage, disk)

        if metrics is not None:
            metrics.watch_runs(disk.root)
        return cls(
            config,
            AsyncStore(disk),
            connect,
            watch if config.watch_drift else None,
            urls=HttpBlobs if config.blob_urls or config.blob_base_url else None,
            metrics=metrics,
            measure_disk=measure,
        )

    @property
    def running(self) -> bool:
        """Started and not ended (by shutdown or a fatal error)."""
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        """Runs until shutdown() or a fatal error (lock held, no trusted key, a dead worker)."""
        cfg = self.config
        with self.store.agent_lock():
            removed = await self.store.cleanup_temp()
            if removed:
                log.info("removed %d leftover temp entries from an earlier run", removed)
            self.started.set()
            self._sample_disk()
            client = self._connect()
            urls = self._urls() if self._urls is not None else None
            try:
                verify = await self._manifest_verifier(client)
                deps = ReconcileDeps(
                    pkgs=self.store,
                    trees=self.store,
                    state=self.store,
                    core=client,
                    verify_manifest=verify,
                    unsupported_wheels=tags.unsupported_wheels,
                    describe_interpreter=tags.describe_interpreter,
                    unpack_concurrency=cfg.unpack_concurrency,
                    pull_concurrency=cfg.pull_concurrency,
                    urls=urls,
                    blob_base_url=cfg.blob_base_url,
                    wall_clock=self._clock,
                    tree_grace_seconds=cfg.tree_grace_seconds,
                    deltas=cfg.deltas,
                    max_window_log=cfg.max_window_log,
                    delta_wait_seconds=cfg.delta_wait_seconds,
                    store_gc=cfg.store_gc,
                )
                reconciler = Reconciler(
                    deps, on_result=self._on_result, on_store_gc=self._on_store_gc
                )
                self._retry = SyncRetry(reconciler, Backoff(cfg.retry_base, cfg.retry_cap))
                # Leaving this block re-raises the error a dead worker died of (shutdown()).
                async with reconciler:
                    watcher = self._watch_drift(reconciler) if self._watch_drift else None
                    if watcher is not None:
                        await watcher.start()
                    try:
                        await self._serve(client, reconciler, reconciler.start())
                    finally:
                        self._retry.cancel()
                        if watcher is not None:
                            await watcher.stop()
            finally:
                await client.close()
                if urls is not None:
                    await urls.close()

    async def _serve(
        self, client: CoreConnection, reconciler: Reconciler, worker: asyncio.Task[None]
    ) -> None:
        """Feed the worker from the refresh stream until either of them ends."""
        stream = asyncio.create_task(self._stream_loop(client, reconciler), name="spk-refresh")
        store_gc = self.config.store_gc
        timers = [
            asyncio.create_task(
                self._gc_timer(reconciler, self.config.tree_gc_interval, False),
                name="spk-tree-gc",
            ),
            asyncio.create_task(
                self._gc_timer(
                    reconciler, store_gc.interval_seconds if store_gc.enabled else 0, True
                ),
                name="spk-store-gc",
            ),
        ]
        try:
            await asyncio.wait({stream, worker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for timer in timers:
                timer.cancel()
            stream.cancel()
            for timer in timers:
                with contextlib.suppress(asyncio.CancelledError):
                    await timer
            with contextlib.suppress(asyncio.CancelledError):
                await stream  # the stream loop ends only with an error: raised here
        error = None if worker.cancelled() else worker.exception()
        if error is not None:
            self.worker_error = error
            log.error(
                "the reconcile worker died (%s: %s); stopping the agent rather than feeding it"
                " hashes",
                type(error).__name__,
                error,
                exc_info=error,
            )

    @staticmethod
    async def _gc_timer(reconciler: Reconciler, interval: float, store: bool) -> None:
        """Queue a GC pass every interval (0: never); the reconcile worker runs it between
        syncs. Tree GC is cheap and frequent; store GC walks blobs/ and pkgs/, so hourly."""
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            reconciler.request_gc(store=store)

    def _on_result(self, result: ReconcileResult) -> None:
        self.last_result = result
        structured = fields(
            lockfile_hash=result.lockfile_hash,
            sequence=self._sequences.get(result.lockfile_hash, 0),
            environment=self.environment,
            status=result.outcome.value,
            duration_seconds=result.duration_ms / 1000,
            blobs=result.blobs_pulled,
            bytes=result.bytes_pulled,
        )
        if result.ok:
            by_url = f", {result.blobs_by_url} from URLs" if result.blobs_by_url else ""
            fell_back = f", {result.url_fallbacks} fell back" if result.url_fallbacks else ""
            patched = f", {result.patches_used} from patches" if result.patches_used else ""
            if result.patch_fallbacks:
                patched += f", {result.patch_fallbacks} patch(es) fell back to the whole wheel"
            log.info(
                "%s %s (%d blobs%s%s%s, %d bytes on the wire for %d bytes of wheels, %d ms)",
                result.outcome.value,
                result.lockfile_hash[:12] or "(nothing desired)",
                result.blobs_pulled,
                by_url,
                fell_back,
                patched,
                result.bytes_pulled,
                result.wheel_bytes,
                result.duration_ms,
                extra=structured,
            )
        else:
            log.error(
                "sync to %s failed: %s",
                result.lockfile_hash[:12],
                result.error,
                extra={**structured, "error": result.error},
            )
        if self.metrics is not None:
            self._count(self.metrics, result)
        if self.on_result is not None:
            self.on_result(result)
        if self._retry is not None:
            self._retry.on_result(result)

    def _on_store_gc(self, report: StoreGcReport) -> None:
        """A scheduled store GC pass (the one after a flip comes with its result)."""
        if self.metrics is not None:
            self.metrics.store_gc(report)
            self._sample_disk()

    def _count(self, metrics: AgentMetrics, result: ReconcileResult) -> None:
        metrics.record(result, self._clock())
        if result.outcome in (Outcome.FLIPPED, Outcome.ALREADY_CURRENT):
            h = result.lockfile_hash
            metrics.current(h, self.environment, self._sequences.get(h, 0), converged=True)
        elif result.outcome is Outcome.FAILED and not result.drift_repair:
            metrics.converged.set(0)
        if result.outcome is not Outcome.INTACT:
            self._sample_disk()

    def _sample_disk(self) -> None:
        """Measure the data dir in a thread, one measurement at a time (after syncs only)."""
        metrics, measure = self.metrics, self._measure_disk
        if metrics is None or measure is None:
            return
        if self._measuring is not None and not self._measuring.done():
            return

        async def run() -> None:
            try:
                usage = await measure()
            except Exception as exc:  # a metric is not worth failing anything for
                log.debug("measuring the data dir failed: %s", exc)
                return
            metrics.disk(usage.areas, usage.current_tree_bytes, usage.trees)

        self._measuring = asyncio.ensure_future(run())

    async def _manifest_verifier(self, client: CoreConnection) -> Callable[[Manifest], None]:
        pem = self.config.signing_key_pem
        if pem is None:
            pem = await self.store.read_pinned_key()
        if pem is None:
            if not self.config.trust_on_first_use:
                raise SpkError(
                    "no signing key to verify manifests: pass --signing-key (from"
                    " `spk-core signing-key export`) or opt in to --trust-on-first-use"
                )
            pem = await self._fetch_key_with_retry(client)
            await self.store.pin_key(pem)
            log.warning(
                "TRUST ON FIRST USE: pinned the core's signing key %s from the network; verify it"
                " against `spk-core signing-key export` on the core",
                key_id(load_public_key_pem(pem)),
            )
        keys = load_public_keys_pem(pem)

        def verify(manifest: Manifest) -> None:
            verify_manifest_any(manifest, keys)

        return verify

    async def _fetch_key_with_retry(self, client: CoreConnection) -> str:
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap)
        while True:
            try:
                return await client.signing_key_pem()
            except Unauthenticated:
                raise
            except SpkError as exc:
                log.warning("fetching the signing key failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())

    async def _stream_loop(self, client: CoreConnection, reconciler: Reconciler) -> None:
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap)
        while True:
            try:
                current = await self.store.current_hash() or ""
                async for desired in client.subscribe(current):
                    if not self.connected.is_set():
                        log.info("connected to core %s", self.config.core)
                        self.connected.set()
                        if self.metrics is not None:
                            self.metrics.stream_connected.set(1)
                    backoff.reset()
                    if self.metrics is not None:
                        self.metrics.unserved.set(1 if desired.unserved else 0)
                        if desired.unserved:  # it keeps its tree, but runs no desired release
                            self.metrics.converged.set(0)
                    if desired.unserved:
                        await self._unserved(desired.unserved)
                        continue
                    if desired.environment and desired.environment != self.environment:
                        log.info(
                            "served by the core's environment %s",
                            desired.environment,
                            extra=fields(environment=desired.environment),
                        )
                    self.environment = desired.environment
                    self.unserved = ""
                    if desired.lockfile_hash:
                        self._sequences[desired.lockfile_hash] = desired.sequence
                    if self.metrics is not None and desired.lockfile_hash != current:
                        self.metrics.converged.set(0)
                    reconciler.request(desired.lockfile_hash)
                log.info("core closed the refresh stream; reconnecting")
            except Unauthenticated as exc:
                log.error("the core refused this satellite (%s); is the token revoked?", exc)
                backoff.attempt = 32  # retry rarely: an operator has to act first
            except SpkError as exc:
                log.warning("refresh stream lost: %s", exc)
            self.connected.clear()
            self.reconnects += 1
            if self.metrics is not None:
                self.metrics.stream_connected.set(0)
                self.metrics.reconnects.inc()
            await asyncio.sleep(backoff.next_delay())

    async def _unserved(self, reason: str) -> None:
        """No environment of the core fits this host: keep the current tree (scripts go on
        running against it), say why once, and record it for `spk-satellite status`."""
        if reason != self.unserved:
            log.warning("the core serves no environment for this host: %s", reason)
        self.unserved, self.environment = reason, ""
        state = await self.store.load_state()
        if state.status != "unserved" or state.error != reason:
            await self.store.save_state(
                dataclasses.replace(
                    state, status="unserved", error=reason, updated_at_unix=self._clock()
                )
            )

    # ---- lifecycle ----
    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"spk-agent-{self.config.data_dir}")
        return self._task

    async def shutdown(self) -> None:
        """Idempotent. An in-flight reconcile is cancelled; partial downloads stay for resume."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_synced(self, lockfile_hash: str, within: float) -> ReconcileResult:
        """For tests and benchmarks: until a reconcile to `lockfile_hash` succeeded."""
        async with asyncio.timeout(within):
            while True:
                result = self.last_result
                if result is not None and result.lockfile_hash == lockfile_hash and result.ok:
                    return result
                if self._task is not None and self._task.done():
                    self._task.result()
                    raise IntegrityError("agent stopped")
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> Agent:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()
