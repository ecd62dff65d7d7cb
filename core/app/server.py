"""Server assembly: grpc.aio with auth, reflection (v1alpha + v1), health, and a clean lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.api.admin_service import AdminService
from core.api.auth import AuthInterceptor, TransportPolicy
from core.api.distribution_service import DistributionService
from core.api.metrics import CoreMetrics
from core.api.release_tools import ReleaseTools
from core.app.grpc_server import (
    SERVER_OPTIONS,
    SERVICE_NAMES,
    add_reflection,
    registered_methods,
    server_credentials,
)
from core.app.metrics_runtime import MetricsSampler, MetricsServer
from core.app.storage_runtime import StorageRuntime
from core.fanout import notify
from core.fanout.desired import load_desired
from core.fanout.hub import Desired, Hub
from core.fanout.stream_leases import StreamLeases
from core.install.audit import DAY_SECONDS, Auditor, FindingsCounter
from core.install.install_state import recover_stale_install, remove_stale_work
from core.install.installer import Installer
from core.state import environments, lockfiles, tokens
from core.state.db import Database, open_database
from core.state.keys import SecretBox, load_or_create_key
from core.storage.backends import StoreRegistry
from core.storage.blob_urls import BlobUrlPolicy, BlobUrls
from core.storage.delta_plan import DeltaPolicy
from core.storage.deltas import DeltaService
from core.storage.gc import GcPolicy
from shared.errors import StoreError
from shared.proto.scriptpkgs.v1 import (
    admin_pb2_grpc,
    distribution_pb2_grpc,
)
from shared.tree_content import DEFAULT_CONTENT_POLICY, TreeContentPolicy

log = logging.getLogger(__name__)
DESIRED_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class CoreConfig:
    """Parsed once at the edge (CLI/env) and passed in."""

    data_dir: Path
    listen: str = "127.0.0.1:50051"
    database_url: str | None = None  # None: SQLite in data_dir
    bootstrap_admin_token: str | None = None  # from SPK_ADMIN_TOKEN; stored hashed
    tls_cert: Path | None = None  # PEM chain; TLS when set (with tls_key)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mTLS: every client presents a cert signed by this CA
    insecure: bool = False  # accept bearer tokens over plaintext from non-loopback peers
    # How often the desired hash is re-read from the database: the backstop that carries a change
    # made by another core instance (or straight in the database) to this instance's streams.
    desired_poll_seconds: float = DESIRED_POLL_SECONDS
    gc: GcPolicy = field(default_factory=GcPolicy)  # blob GC: kept, grace, schedule (0: off)
    audit_interval_seconds: int = DAY_SECONDS  # scheduled audit of the desired release; 0: off
    blob_urls: BlobUrlPolicy = field(default_factory=BlobUrlPolicy)  # bytes without the core
    deltas: DeltaPolicy = field(default_factory=DeltaPolicy)  # binary patches between wheels
    # Which packages may ship start-up hooks (.pth, sitecustomize): --allow-pth, tree_content.
    content: TreeContentPolicy = DEFAULT_CONTENT_POLICY

    @property
    def shares_state(self) -> bool:
        """Postgres: other core instances may serve the same fleet from the same state."""
        return (self.database_url or "").startswith(("postgres://", "postgresql://"))

    metrics_listen: str | None = None  # HOST:PORT for /metrics; None: no metrics endpoint
    # Where SPK_SECRET_KEY and the SPK_S3_* settings are read from: the environment merged with
    # systemd credentials (shared/credentials.py) by the CLI; None: os.environ.
    environ: Mapping[str, str] | None = field(default=None, repr=False)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s failed", task, exc_info=exc)


def prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        probe = data_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"data dir {data_dir} is not writable: {exc.strerror}") from None


class CoreServer:
    """`async with CoreServer(config) as core: await core.wait()`; `stop()` is idempotent.

    Everything start() opens is registered on an exit stack as it is opened, so a start that
    fails half-way (a busy port, a bad TLS file, an unreachable database) closes exactly what
    it opened, and stop() closes everything in the reverse order.
    """

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.port = 0
        self._db: Database | None = None
        self._poke = asyncio.Event()  # set by a Postgres NOTIFY: re-read the desired hash now
        self._stopped = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._background: set[asyncio.Future[Any]] = set()  # kept referenced until done
        self._grace = 5.0
        self.hub = Hub()
        self.leases: StreamLeases | None = None  # set in start(): it needs the database
        self.health = health.aio.HealthServicer()
        self.installer: Installer | None = None
        self.deltas: DeltaService | None = None
        self.storage: StorageRuntime | None = None
        # Counted only when served: with metrics off no interceptor runs and no hook counts.
        self.metrics = CoreMetrics() if config.metrics_listen else None
        self.metrics_server: MetricsServer | None = None
        # This server's new audit findings (not the module's AUDIT_FINDINGS, which every core
        # of a process would share).
        self.findings = FindingsCounter()
        if self.metrics is not None:
            self.findings.subscribe(self.metrics.audit_finding)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        cfg = self.config
        stack = self._stack
        prepare_data_dir(cfg.data_dir)
        environ = os.environ if cfg.environ is None else cfg.environ
        box = SecretBox(load_or_create_key(cfg.data_dir, dict(environ)))
        self._db = db = Database(
            await asyncio.to_thread(open_database, cfg.data_dir, cfg.database_url)
        )
        stack.push_async_callback(asyncio.to_thread, db.close)  # joins its threads: off the loop
        if cfg.bootstrap_admin_token:
            await db.run(tokens.ensure_bootstrap_token, cfg.bootstrap_admin_token)
        self.storage = storage = await StorageRuntime.open(
            db, cfg.data_dir, environ, shared=cfg.shares_state
        )
        stack.push_async_callback(storage.stop)
        # Under the installer lock: with Postgres, another instance may be installing right now.
        if await storage.when_idle(recover_stale_install):
            log.warning("an install was interrupted by a restart; marked failed")
        if stale := await asyncio.to_thread(remove_stale_work, cfg.data_dir / "work"):
            log.warning("removed %d leftovers of an interrupted install", len(stale))
        key = await db.run(lockfiles.load_or_create_signing_key, box)
        await db.run(environments.ensure_default)
        self.hub.publish(await db.run(load_desired))
        store = storage.registry  # writes to the active backend, reads fall back across all
        auditor = Auditor(db, box, cfg.audit_interval_seconds, findings=self.findings)
        stack.push_async_callback(auditor.close)  # after the installer's cancel (LIFO)
        self.deltas = deltas = DeltaService(db, store, cfg.deltas, cfg.data_dir / "deltas-tmp")
        deltas.observer = self.metrics
        stack.push_async_callback(deltas.stop)
        self.installer = installer = Installer(
            db,
            box,
            key,
            store,
            self.hub,
            cfg.data_dir / "work",
            storage.lock,
            cfg.content,
            auditor=auditor,
            deltas=deltas,
        )
        installer.observer = self.metrics
        stack.push_async_callback(installer.cancel)
        tools = ReleaseTools(db, box, auditor, store)
        storage_ops = storage.bind(self.hub, key, cfg.gc)
        await storage.migrator.resume_if_stuck()  # before serving, so no install can slip in
        self.leases = StreamLeases(db, self.hub, shared=cfg.shares_state)
        stack.push_async_callback(self.leases.flush)  # after the drain (the stack unwinds LIFO)
        admin = AdminService(db, box, installer, self.hub, storage_ops, tools, self.leases)
        server = self._build_server(db, admin, store, key.public_key())
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(cfg.listen)
            else:
                self.port = server.add_secure_port(cfg.listen, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StoreError(f"cannot listen on {cfg.listen}: address in use or not available")
        await server.start()
        stack.push_async_callback(self._drain, server)
        for name in [*SERVICE_NAMES, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._spawn(self._poll_desired(), "desired-poll")
        if cfg.shares_state and cfg.database_url:
            self._start_notify(cfg.database_url, db)
            self._spawn(self.leases.run(), "stream-leases")
        storage.start_background()
        self._spawn(auditor.run_schedule(), "audit-schedule")
        if self.metrics is not None and cfg.metrics_listen:
            self._serve_metrics(self.metrics, cfg.metrics_listen, admin)
        log.info(
            "core listening on %s (port %d, %s), data dir %s",
            cfg.listen,
            self.port,
            "TLS" if credentials else "plaintext",
            cfg.data_dir,
        )

    def _serve_metrics(self, metrics: CoreMetrics, listen: str, admin: AdminService) -> None:
        self.metrics_server = served = MetricsServer.start(listen, metrics.registry)
        self._stack.push_async_callback(asyncio.to_thread, served.close)
        self._spawn(MetricsSampler(metrics, admin, self.hub.is_connected).run(), "metrics-sampler")
        log.info("metrics on %s", served.url)

    def _build_server(
        self,
        db: Database,
        admin: AdminService,
        store: StoreRegistry,
        public_key: Ed25519PublicKey,
    ) -> grpc.aio.Server:
        cfg = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.metrics is not None:  # outermost: it sees the status every call ends with
            interceptors.append(self.metrics.grpc.interceptor())
        interceptors.append(
            AuthInterceptor(
                db,
                TransportPolicy(
                    allow_plaintext_tokens=cfg.insecure,
                    require_client_cert=cfg.tls_client_ca is not None,
                ),
            )
        )
        server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        admin_pb2_grpc.add_PackageAdminServicer_to_server(admin, server)
        distribution_pb2_grpc.add_PackageDistributionServicer_to_server(
            DistributionService(
                db,
                self.hub,
                store,
                public_key,
                urls=BlobUrls(cfg.blob_urls, store),
                deltas=self.deltas,
                metrics=self.metrics,
                leases=self.leases,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        add_reflection(server)
        if self.metrics is not None:
            self.metrics.grpc.preregister(registered_methods())
        return server

    async def _drain(self, server: grpc.aio.Server) -> None:
        """Shutdown: NOT_SERVING first, so a load balancer stops sending new streams here,
        then end the refresh streams (agents reconnect elsewhere) and let calls finish."""
        for name in [*SERVICE_NAMES, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.hub.close_all()
        await server.stop(self._grace)

    def _spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        """A background task that is kept referenced, logged if it fails, cancelled on stop."""
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

        self._stack.push_async_callback(cancel)

    def _start_notify(self, dsn: str, db: Database) -> None:
        """Several instances share Postgres: tell the others about our changes at once."""

        async def send_quietly() -> None:
            try:
                await db.run(notify.send, db.db)
            except Exception as exc:
                log.warning("NOTIFY to other core instances failed (they poll anyway): %s", exc)

        def send(_value: Desired) -> None:
            task = asyncio.ensure_future(send_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self.hub.on_local_change = send
        listener = notify.Listener(dsn, self._poke.set, asyncio.get_running_loop())
        listener.start()
        self._stack.push_async_callback(asyncio.to_thread, listener.stop)

    async def _poll_desired(self) -> None:
        """Backstop: another core instance (or a restore) may change the desired hash. A NOTIFY
        from another instance cuts the wait short."""
        assert self._db is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.config.desired_poll_seconds)
            self._poke.clear()
            try:
                self.hub.publish(await self._db.run(load_desired), local=False)
            except Exception:  # keep polling; the next round may succeed
                log.exception("reading the desired hash failed")

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._grace = grace
        await self._stack.aclose()

    async def __aenter__(self) -> CoreServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
