"""Every metric a satellite agent exposes, on a registry of its own (many agents may share a
process: the fan-out benchmark hosts hundreds, so nothing here is global).

    spk_satellite_release_info{lockfile_hash,environment} 1    the current tree (info metric)
    spk_satellite_release_sequence                             its release sequence
    spk_satellite_converged                                    1: current == desired, last sync ok
    spk_satellite_unserved                                     1: no environment of the core fits
    spk_satellite_last_sync_success_timestamp_seconds
    spk_satellite_sync_duration_seconds                        histogram, reconciles that ran
    spk_satellite_syncs_total{outcome}                         flipped | already_current | ...
    spk_satellite_pulled_blobs_total / _pulled_bytes_total
    spk_satellite_verification_failures_total                  a hash, size or signature mismatch
    spk_satellite_stream_connected / _reconnects_total
    spk_satellite_drift_repairs_total{result}                  intact | repaired | failed
    spk_satellite_store_bytes{area} / _current_tree_bytes / _trees   on disk
    spk_satellite_script_runs_started_total / _finished_total{exit_code} / _refused_total

A hash label is fine here (one series per agent, replaced on a flip); the core never has one.
Script runs are separate processes (`spk-satellite run`): they count into a small file in the
data dir (satellite/run_stats.py) that this registry reads at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from satellite.run_stats import RunStats, read_run_stats
from satellite.sync import Outcome, ReconcileResult
from shared.errors import IntegrityError, UnsafeWheel

SYNC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
AREAS = ("blobs", "pkgs", "trees")


def is_verification_failure(exc: BaseException | None) -> bool:
    """A hash, size or signature that did not match, anywhere in the cause chain."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, IntegrityError | UnsafeWheel):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class _RunsCollector(Collector):
    """Reads the run counters a data dir's `spk-satellite run` processes keep, per scrape."""

    def __init__(self, read: Callable[[], RunStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._read()
        started = CounterMetricFamily(
            "spk_satellite_script_runs_started",
            "Script runs started with `spk-satellite run` on this data dir.",
        )
        started.add_metric([], stats.started)
        yield started
        refused = CounterMetricFamily(
            "spk_satellite_script_runs_refused",
            "Script runs refused because the desired packages were not ready.",
        )
        refused.add_metric([], stats.refused)
        yield refused
        finished = CounterMetricFamily(
            "spk_satellite_script_runs_finished",
            "Script runs that ended, by exit code (128+N: killed by signal N).",
            labels=["exit_code"],
        )
        for code, count in sorted(stats.exit_codes.items()):
            finished.add_metric([str(code)], count)
        yield finished


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        """`process`: also the standard process_* series (off when agents share a process)."""
        r = self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            ProcessCollector(registry=r)
        self.release = Info(
            "spk_satellite_release",
            "The tree `current` names: its lockfile hash and environment.",
            registry=r,
        )
        self.release_sequence = Gauge(
            "spk_satellite_release_sequence",
            "Release sequence of the current tree (0 before the first sync).",
            registry=r,
        )
        self.converged = Gauge(
            "spk_satellite_converged",
            "1 when the current tree is the desired one and the last sync succeeded.",
            registry=r,
        )
        self.unserved = Gauge(
            "spk_satellite_unserved",
            "1 while the core serves no environment that fits this host.",
            registry=r,
        )
        self.last_success = Gauge(
            "spk_satellite_last_sync_success_timestamp_seconds",
            "When a sync last succeeded (Unix time); 0 before the first.",
            registry=r,
        )
        self.sync_duration = Histogram(
            "spk_satellite_sync_duration_seconds",
            "Wall time of syncs (reconciles), successful or not.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.syncs = Counter(
            "spk_satellite_syncs",
            "Syncs by outcome: flipped, already_current, nothing_desired, superseded, failed.",
            ["outcome"],
            registry=r,
        )
        self.pulled_blobs = Counter(
            "spk_satellite_pulled_blobs", "Blobs downloaded from the core.", registry=r
        )
        self.pulled_bytes = Counter(
            "spk_satellite_pulled_bytes", "Blob bytes downloaded from the core.", registry=r
        )
        self.verification_failures = Counter(
            "spk_satellite_verification_failures",
            "Syncs or repairs that failed on a hash, size or signature mismatch.",
            registry=r,
        )
        self.stream_connected = Gauge(
            "spk_satellite_stream_connected",
            "1 while the refresh stream to the core is open.",
            registry=r,
        )
        self.reconnects = Counter(
            "spk_satellite_reconnects", "Refresh streams lost and opened again.", registry=r
        )
        self.drift_repairs = Counter(
            "spk_satellite_drift_repairs",
            "Drift checks of the current tree by result: intact, repaired, failed.",
            ["result"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "spk_satellite_store_bytes",
            "Bytes of regular files on disk per area of the data dir (hard links once).",
            ["area"],
            registry=r,
        )
        self.tree_bytes = Gauge(
            "spk_satellite_current_tree_bytes",
            "Size of the files of the current tree (its packages, unpacked).",
            registry=r,
        )
        self.trees = Gauge(
            "spk_satellite_trees", "Complete trees on disk, current included.", registry=r
        )
        for outcome in (o for o in Outcome if o not in (Outcome.REPAIRED, Outcome.INTACT)):
            self.syncs.labels(outcome.value)
        for result in ("intact", "repaired", "failed"):
            self.drift_repairs.labels(result)
        self.stream_connected.set(0)
        self.unserved.set(0)

    def watch_runs(self, data_dir: Path) -> None:
        """Expose the script-run counters kept in `data_dir` (read at each scrape)."""
        self.registry.register(_RunsCollector(lambda: read_run_stats(data_dir)))

    def record(self, result: ReconcileResult, now: float) -> None:
        """Count one reconcile or drift-repair result."""
        self.pulled_blobs.inc(result.blobs_pulled)
        self.pulled_bytes.inc(result.bytes_pulled)
        if result.outcome is Outcome.FAILED and is_verification_failure(result.exception):
            self.verification_failures.inc()
        if result.drift_repair:
            name = {Outcome.INTACT: "intact", Outcome.REPAIRED: "repaired"}
            self.drift_repairs.labels(name.get(result.outcome, "failed")).inc()
            return
        self.syncs.labels(result.outcome.value).inc()
        self.sync_duration.observe(result.duration_ms / 1000)
        if result.ok:
            self.last_success.set(now)

    def current(self, lockfile_hash: str, environment: str, sequence: int, converged: bool) -> None:
        self.release.info({"lockfile_hash": lockfile_hash, "environment": environment})
        self.release_sequence.set(sequence)
        self.converged.set(1 if converged else 0)

    def disk(self, usage: dict[str, int], tree_bytes: int, trees: int) -> None:
        for area in AREAS:
            self.store_bytes.labels(area).set(usage.get(area, 0))
        self.tree_bytes.set(tree_bytes)
        self.trees.set(trees)
