"""The core's /metrics: the HTTP server, and the gauges sampled from the database.

Counters are counted where things happen (core/api/metrics.py). What lives in the database (the
fleet, the desired release and its latest audit, storage, GC, migration) is sampled every
`interval` seconds through the same servicer methods the admin API answers with, so a dashboard
and `spk-core admin status` never disagree about what "converged" means. One sample is a
handful of small queries on the database thread; with metrics off nothing here runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from core.api.admin_service import AdminService
from core.api.metrics import FLEET_STATES, CoreMetrics
from core.state.audits import SEVERITIES
from shared.errors import NotFound
from shared.metrics_http import MetricsServer
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 5.0
AUDIT_HISTORY = 10  # older audits searched for the last complete one


class MetricsSampler:
    """Sets the database-derived gauges of `metrics` from `admin`'s answers."""

    def __init__(
        self, metrics: CoreMetrics, admin: AdminService, here: Callable[[str], bool] | None = None
    ) -> None:
        self._m = metrics
        self._admin = admin
        # Streams open on this instance (the hub): ListSatellites' `connected` counts any
        # instance's, and spk_satellites_connected is per instance (summed across them).
        self._here = here
        self._fleet_labels: set[tuple[str, str]] = set()
        self._connected_labels: set[str] = set()

    async def sample(self) -> None:
        a, m = self._admin, self._m
        install = await a.GetInstallState(pb.GetInstallStateRequest(), None)
        if install.status == pb.INSTALL_STATUS_READY:
            m.install_last_result.set(1)
        elif install.status == pb.INSTALL_STATUS_ERROR:
            m.install_last_result.set(0)
        releases = await a.ListReleases(pb.ListReleasesRequest(), None)
        current = next((r for r in releases.releases if r.current), None)
        m.release_sequence.set(current.sequence if current else 0)
        m.release_time.set(current.created_at_unix if current else 0)
        self._fleet(await a.ListSatellites(pb.ListSatellitesRequest(), None))
        self._storage(await a.ListStorageBackends(pb.ListStorageBackendsRequest(), None))
        gc = await a.GetBlobGcState(pb.GetBlobGcStateRequest(), None)
        last = gc.last_run if gc.HasField("last_run") else None
        m.gc_last_run.set(last.finished_at_unix if last else 0)
        m.gc_last_deleted.set(last.deleted if last else 0)
        m.gc_last_failed.set(last.failed if last else 0)
        m.gc_next_run.set(gc.next_run_unix)
        m.gc_deleted.set(gc.total_deleted)
        m.gc_reclaimed.set(gc.total_bytes_reclaimed)
        mig = await a.GetStorageMigrationState(pb.GetStorageMigrationStateRequest(), None)
        m.migration_running.set(1 if mig.status == "migrating" else 0)
        m.migration_failed.set(1 if mig.status == "error" else 0)
        m.migration_done.set(mig.done)
        m.migration_total.set(mig.total)
        m.migration_bytes.set(mig.bytes)
        try:  # the desired release's audits
            audit: pb.GetAuditResponse | None = await a.GetAudit(
                pb.GetAuditRequest(history=AUDIT_HISTORY), None
            )
        except NotFound:  # nothing published yet
            audit = None
        set_audit_gauges(m, audit, await a.GetAuditPolicy(pb.GetAuditPolicyRequest(), None))
        m.sampled_at.set(time.time())

    def _fleet(self, reply: pb.ListSatellitesResponse) -> None:
        seen: set[tuple[str, str]] = set()
        for row in reply.summary:
            for state in FLEET_STATES:
                self._m.satellites.labels(row.environment, state).set(getattr(row, state))
                seen.add((row.environment, state))
        for gone in self._fleet_labels - seen:  # an environment that was removed
            self._m.satellites.remove(*gone)
        self._fleet_labels = seen
        connected: dict[str, int] = {}
        for s in reply.satellites:
            if not s.revoked:
                here = self._here(s.name) if self._here is not None else s.connected
                connected[s.environment] = connected.get(s.environment, 0) + int(here)
        for env, count in connected.items():
            self._m.satellites_connected.labels(env).set(count)
        for env in self._connected_labels - set(connected):
            self._m.satellites_connected.remove(env)
        self._connected_labels = set(connected)

    def _storage(self, reply: pb.ListStorageBackendsResponse) -> None:
        for b in reply.backends:
            self._m.storage_blobs.labels(b.name).set(b.blob_count)
            self._m.storage_bytes.labels(b.name).set(b.bytes)
            self._m.storage_active.labels(b.name).set(1 if b.active else 0)

    async def run(self, interval: float = SAMPLE_SECONDS) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # the next round may succeed; a scrape shows sampled_at
                log.warning("sampling metrics from the database failed: %s", exc)
            await asyncio.sleep(interval)


def set_audit_gauges(
    m: CoreMetrics, audit: pb.GetAuditResponse | None, policy: pb.AuditPolicy
) -> None:
    """The audit gauges from GetAudit of the desired release (None: nothing published yet).

    Findings are the latest audit's; while that one is incomplete, at least the last complete
    one's, so an advisory source that is down does not clear a known finding.
    """
    has_latest = audit is not None and audit.HasField("latest")
    audits = [audit.latest, *audit.history] if audit is not None and has_latest else []
    latest = audits[0] if audits else None
    last_complete = next((x for x in audits if x.status == "ok"), None)
    counts = dict.fromkeys(SEVERITIES, 0)
    for x in (latest, last_complete):
        for c in x.counts if x is not None else ():
            if c.severity in counts:  # a fixed set of labels, whatever the database holds
                counts[c.severity] = max(counts[c.severity], c.count)
    for severity, count in counts.items():
        m.audit_findings.labels(severity).set(count)
    m.audit_last_checked.set(latest.checked_at_unix if latest is not None else 0)
    # Incomplete: published, but its latest audit did not reach the source (or none ran yet).
    # Auditing turned off by policy is a choice, not an incomplete audit.
    checked = latest is not None and latest.status == "ok"
    m.audit_incomplete.set(0 if audit is None or checked or policy.source == "off" else 1)
    m.audit_next_run.set(policy.next_run_unix)


__all__ = ["MetricsSampler", "MetricsServer", "set_audit_gauges"]
