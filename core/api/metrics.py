"""Every metric the core exposes, defined in one place on a registry passed in.

Naming follows Prometheus conventions: `spk_` prefix, `_total` counters, `_seconds`, `_bytes`,
base units. No label takes an unbounded value: never a satellite name, a hash, a URL or a
package; the labels are `result`, `status`, `state`, `severity` (fixed sets), `environment` (the
admin's short list) and `backend` (filesystem | database | s3). Per-satellite detail is in
`spk-core admin satellites list` and on each agent's own /metrics.

Counted where things happen (installs, blob streams, reports, subscriptions, blob URLs and delta
offers, patch computations, new audit findings), through small hooks: the installer's
`observer`, the DeltaService's `observer`, the server's FindingsCounter. What lives in the
database (fleet, releases, storage, GC, migration, the desired release's audit) is sampled by
core/app/metrics_runtime.py into the gauges defined here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from core.api.grpc_metrics import GrpcServerMetrics
from core.state.audits import SEVERITIES

INSTALL_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
FLEET_STATES = ("converged", "syncing", "error", "unserved", "other")
# How a patch computation ended (core.storage.deltas.DeltaObserver): stored and offered, not
# worth keeping (too big, or too large a window), or an error (retried later).
DELTA_RESULTS = ("ready", "useless", "failed")


class CoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, _cpu_seconds_total, fds
        self.grpc = GrpcServerMetrics(r)
        # ---- installs (counted by the installer's on_settled hook) ----
        self.installs = Counter(
            "spk_installs", "Installs finished, by result (ready | error).", ["result"], registry=r
        )
        self.install_duration = Histogram(
            "spk_install_duration_seconds",
            "Wall time of finished installs, resolution to publication.",
            ["result"],
            buckets=INSTALL_BUCKETS,
            registry=r,
        )
        self.install_running = Gauge(
            "spk_install_in_progress", "1 while an install runs on this instance.", registry=r
        )
        self.install_last_result = Gauge(
            "spk_install_last_success",
            "1 if the last install (any instance) ended ready, 0 if it failed; absent before any.",
            registry=r,
        )
        # ---- the desired release ----
        self.release_sequence = Gauge(
            "spk_desired_release_sequence", "Sequence number of the desired release.", registry=r
        )
        self.release_time = Gauge(
            "spk_desired_release_timestamp_seconds",
            "When the desired release was published (Unix time).",
            registry=r,
        )
        # ---- fleet ----
        self.satellites = Gauge(
            "spk_satellites",
            "Registered (not revoked) satellites by environment and state: converged (ready on"
            " its environment's desired hash), syncing, error, unserved, other (behind or never"
            " reported).",
            ["environment", "state"],
            registry=r,
        )
        self.satellites_connected = Gauge(
            "spk_satellites_connected",
            "Satellites with a refresh stream open on this instance, by environment.",
            ["environment"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "spk_subscriptions_open", "Open RefreshScriptPackages streams.", registry=r
        )
        self.sync_reports = Counter(
            "spk_sync_reports",
            "Sync reports received from satellites, by status (syncing | ready | error).",
            ["status"],
            registry=r,
        )
        # ---- blobs served ----
        self.blob_downloads = Counter(
            "spk_blob_downloads", "DownloadBlob streams started.", registry=r
        )
        self.blob_resumes = Counter(
            "spk_blob_download_resumes",
            "DownloadBlob streams that resumed a partial download (offset > 0).",
            registry=r,
        )
        self.blob_bytes = Counter(
            "spk_blob_served_bytes", "Blob bytes sent to satellites.", registry=r
        )
        self.blob_chunks = Counter(
            "spk_blob_served_chunks", "Blob chunks (messages) sent to satellites.", registry=r
        )
        # ---- storage, GC, migration (sampled from the database) ----
        self.storage_blobs = Gauge(
            "spk_storage_blobs", "Blobs indexed per storage backend.", ["backend"], registry=r
        )
        self.storage_bytes = Gauge(
            "spk_storage_bytes", "Bytes indexed per storage backend.", ["backend"], registry=r
        )
        self.storage_active = Gauge(
            "spk_storage_backend_active",
            "1 for the backend new blobs are written to.",
            ["backend"],
            registry=r,
        )
        self.gc_last_run = Gauge(
            "spk_gc_last_run_timestamp_seconds",
            "When the last blob GC pass (any instance) finished; 0 before the first.",
            registry=r,
        )
        self.gc_next_run = Gauge(
            "spk_gc_next_run_timestamp_seconds",
            "When the next scheduled blob GC pass is due; 0 when none is scheduled.",
            registry=r,
        )
        self.gc_last_deleted = Gauge(
            "spk_gc_last_run_deleted_blobs", "Blobs deleted by the last GC pass.", registry=r
        )
        self.gc_last_failed = Gauge(
            "spk_gc_last_run_failed_deletes",
            "Deletes that failed in the last GC pass (retried by the next).",
            registry=r,
        )
        self.gc_deleted = Gauge(
            "spk_gc_deleted_blobs",
            "Blobs deleted by GC since the database was created (shared by all instances).",
            registry=r,
        )
        self.gc_reclaimed = Gauge(
            "spk_gc_reclaimed_bytes",
            "Bytes reclaimed by GC since the database was created (shared by all instances).",
            registry=r,
        )
        self.migration_running = Gauge(
            "spk_storage_migration_running", "1 while a storage migration runs.", registry=r
        )
        self.migration_failed = Gauge(
            "spk_storage_migration_failed",
            "1 when the last storage migration stopped with an error.",
            registry=r,
        )
        self.migration_done = Gauge(
            "spk_storage_migration_done_blobs",
            "Blobs copied, verified and flipped by the current or last migration.",
            registry=r,
        )
        self.migration_total = Gauge(
            "spk_storage_migration_total_blobs",
            "Blobs the current or last migration set out to move.",
            registry=r,
        )
        self.migration_bytes = Gauge(
            "spk_storage_migration_copied_bytes",
            "Bytes copied by the current or last migration.",
            registry=r,
        )
        # ---- blob URLs and deltas (counted where they are handed out or computed) ----
        self.blob_locations = Counter(
            "spk_blob_locations_issued",
            "Blob URLs (presigned or CDN) handed out by GetBlobLocations.",
            registry=r,
        )
        self.delta_offers = Counter(
            "spk_delta_offers", "Patches offered to satellites by GetDeltas.", registry=r
        )
        self.delta_offered_saving = Counter(
            "spk_delta_offered_saved_bytes",
            "Wheel bytes minus patch bytes of the patches offered: what satellites save on the"
            " wire when they apply them (one that falls back pulls the whole wheel).",
            registry=r,
        )
        self.delta_computations = Counter(
            "spk_delta_computations",
            "Patch computations by result: ready (stored, offered), useless (not worth keeping),"
            " failed (retried later).",
            ["result"],
            registry=r,
        )
        # ---- audits: new findings counted as recorded; the rest sampled from the database ----
        self.audit_new_findings = Counter(
            "spk_audit_new_findings",
            "Advisories new or worse than at the previous complete audit, by severity, as this"
            " instance recorded them.",
            ["severity"],
            registry=r,
        )
        self.audit_findings = Gauge(
            "spk_audit_findings",
            "Advisories (ignored ones left out) in the latest audit of the desired release, by"
            " severity; while that audit is incomplete, at least those of the last complete one.",
            ["severity"],
            registry=r,
        )
        self.audit_last_checked = Gauge(
            "spk_audit_last_checked_timestamp_seconds",
            "When the desired release was last audited (Unix time); 0 before its first audit.",
            registry=r,
        )
        self.audit_incomplete = Gauge(
            "spk_audit_incomplete",
            "1 when the desired release has no complete audit: its latest audit's status is not"
            " ok (the advisory source could not be checked) or it has none yet; 0 while auditing"
            " is off.",
            registry=r,
        )
        self.audit_next_run = Gauge(
            "spk_audit_next_run_timestamp_seconds",
            "When the desired release's next scheduled audit is due; 0 when none is scheduled.",
            registry=r,
        )
        self.sampled_at = Gauge(
            "spk_metrics_sampled_timestamp_seconds",
            "When the database-derived gauges above were last refreshed.",
            registry=r,
        )
        for result in ("ready", "error"):
            self.installs.labels(result)
        for status in ("syncing", "ready", "error"):
            self.sync_reports.labels(status)
        for result in DELTA_RESULTS:
            self.delta_computations.labels(result)
        for severity in SEVERITIES:
            self.audit_new_findings.labels(severity)

    # ---- the installer's observer (core.install.installer.InstallObserver) ----
    def install_started(self) -> None:
        self.install_running.set(1)

    def install_settled(self, result: str, seconds: float) -> None:
        """`result` is ready or error."""
        self.install_running.set(0)
        self.installs.labels(result).inc()
        self.install_duration.labels(result).observe(seconds)

    # ---- the DeltaService's observer (core.storage.deltas.DeltaObserver) ----
    def delta_computed(self, result: str) -> None:
        """`result` is one of DELTA_RESULTS."""
        self.delta_computations.labels(result).inc()

    # ---- a FindingsCounter listener (core.install.audit.FindingsCounter.subscribe) ----
    def audit_finding(self, severity: str, count: int) -> None:
        self.audit_new_findings.labels(severity).inc(count)
