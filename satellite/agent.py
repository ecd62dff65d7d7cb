"""The agent's lifecycle: hold the refresh stream open, feed the reconciler, reconnect with backoff.

    async with Agent(config) as agent:   # or: await Agent(config).run()
        ...                              # agent.shutdown() is idempotent

No module-level state: many agents can share one process (the fan-out benchmark hosts hundreds).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from satellite.backoff import Backoff
from satellite.client import ClientConfig, GrpcCoreClient
from satellite.drift import DriftWatcher
from satellite.reconciler import (
    DEFAULT_TREE_GRACE_SECONDS,
    Outcome,
    ReconcileDeps,
    Reconciler,
    ReconcileResult,
)
from satellite.store import SatelliteStore
from shared.errors import IntegrityError, SpkError, Unauthenticated
from shared.manifest import Manifest
from shared.signing import (
    key_id,
    load_public_key_pem,
    load_public_keys_pem,
    verify_manifest_any,
)

log = logging.getLogger(__name__)
PINNED_KEY_FILE = "signing-key.pem"  # written on trust-on-first-use


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
    # A failed sync is retried on its own after a jittered delay that doubles up to the cap (a
    # full disk gets freed, a core comes back with the blob): without this the agent waited for
    # the next hash or reconnect (docs/reliability.md, fault 4).
    retry_base: float = 2.0
    retry_cap: float = 300.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = SatelliteStore(config.data_dir.absolute())
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.last_result: ReconcileResult | None = None
        self._task: asyncio.Task[None] | None = None
        self._reconciler: Reconciler | None = None
        self._retry = Backoff(config.retry_base, config.retry_cap)
        self._retry_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Runs until shutdown() or a fatal error (lock held, no trusted key)."""
        cfg = self.config
        with self.store.acquire_agent_lock():
            removed = await asyncio.to_thread(self.store.cleanup_temp)
            if removed:
                log.info("removed %d leftover temp entries from an earlier run", len(removed))
            client = GrpcCoreClient(
                ClientConfig(
                    cfg.core, cfg.token, cfg.ca_certificates, cfg.client_cert, cfg.client_key
                )
            )
            try:
                verify = await self._manifest_verifier(client)
                deps = ReconcileDeps(
                    store=self.store,
                    core=client,
                    verify_manifest=verify,
                    tree_grace_seconds=cfg.tree_grace_seconds,
                    pull_concurrency=cfg.pull_concurrency,
                )
                reconciler = Reconciler(deps, on_result=self._on_result)
                self._reconciler = reconciler
                async with reconciler:
                    watcher = DriftWatcher(self.store, reconciler) if cfg.watch_drift else None
                    if watcher is not None:
                        watcher.start()
                    try:
                        await self._stream_loop(client, reconciler)
                    finally:
                        self._cancel_retry()
                        if watcher is not None:
                            watcher.stop()
            finally:
                await client.close()

    def _on_result(self, result: ReconcileResult) -> None:
        self.last_result = result
        if result.ok:
            log.info(
                "%s %s (%d blobs, %d bytes, %d ms)",
                result.outcome.value,
                result.lockfile_hash[:12] or "(nothing desired)",
                result.blobs_pulled,
                result.bytes_pulled,
                result.duration_ms,
            )
        else:
            log.error("sync to %s failed: %s", result.lockfile_hash[:12], result.error)
        self._schedule_retry(result)

    def _schedule_retry(self, result: ReconcileResult) -> None:
        """After a failure, ask the reconciler again later; any newer result supersedes that."""
        self._cancel_retry()
        reconciler = self._reconciler
        if result.ok:
            if result.outcome is not Outcome.SUPERSEDED:
                self._retry.reset()
            return
        if reconciler is None:
            return
        callback: Callable[[], None]
        if result.lockfile_hash == self.store.current_hash():
            callback = reconciler.request_repair  # a failed repair names the current tree
        else:
            callback = functools.partial(reconciler.request, None)  # the desired hash again
        delay = self._retry.next_delay()
        log.info("retrying the failed sync in %.1f s", delay)
        self._retry_timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    async def _manifest_verifier(self, client: GrpcCoreClient) -> Callable[[Manifest], None]:
        pem = self.config.signing_key_pem
        pinned = self.store.root / PINNED_KEY_FILE
        if pem is None and pinned.exists():
            pem = pinned.read_text()
        if pem is None:
            if not self.config.trust_on_first_use:
                raise SpkError(
                    "no signing key to verify manifests: pass --signing-key (from"
                    " `spk-core signing-key export`) or opt in to --trust-on-first-use"
                )
            pem = await self._fetch_key_with_retry(client)
            pinned.write_text(pem)
            log.warning(
                "TRUST ON FIRST USE: pinned the core's signing key %s from the network; verify it"
                " against `spk-core signing-key export` on the core",
                key_id(load_public_key_pem(pem)),
            )
        keys = load_public_keys_pem(pem)

        def verify(manifest: Manifest) -> None:
            verify_manifest_any(manifest, keys)

        return verify

    async def _fetch_key_with_retry(self, client: GrpcCoreClient) -> str:
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap)
        while True:
            try:
                return await client.signing_key_pem()
            except Unauthenticated:
                raise
            except SpkError as exc:
                log.warning("fetching the signing key failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())

    async def _stream_loop(self, client: GrpcCoreClient, reconciler: Reconciler) -> None:
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap)
        while True:
            try:
                current = await asyncio.to_thread(self.store.current_hash) or ""
                async for desired in client.subscribe(current):
                    if not self.connected.is_set():
                        log.info("connected to core %s", self.config.core)
                        self.connected.set()
                    backoff.reset()
                    reconciler.request(desired)
                log.info("core closed the refresh stream; reconnecting")
            except Unauthenticated as exc:
                log.error("the core refused this satellite (%s); is the token revoked?", exc)
                backoff.attempt = 32  # retry rarely: an operator has to act first
            except SpkError as exc:
                log.warning("refresh stream lost: %s", exc)
            self.connected.clear()
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

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
