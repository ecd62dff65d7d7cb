"""Every metric a satellite agent exposes, on a registry of its own (many agents may share a
process: the fan-out benchmark hosts hundreds, so nothing here is global).

    spk_satellite_release_info{lockfile_hash,environment} 1    the current tree (info metric)
    spk_satellite_release_sequence                             its release sequence
    spk_satellite_converged                                    1: current == desired, last sync ok
    spk_satellite_unserved                                     1: no environment of the core fits
    spk_satellite_last_sync_success_timestamp_seconds
    spk_satellite_sync_duration_seconds                        histogram, reconciles that ran
    spk_satellite_syncs_total{outcome}                         flipped | already_current | ...
    spk_satellite_pulled_blobs_total / _pulled_bytes_total / _pulled_wheel_bytes_total
    spk_satellite_blobs_by_url_total / _url_fallbacks_total    URLs instead of the core, and not
    spk_satellite_patches_used_total / _patch_fallbacks_total  binary deltas, and whole blobs
    spk_satellite_verification_failures_total                  a hash, size or signature mismatch
    spk_satellite_stream_connected / _reconnects_total
    spk_satellite_drift_repairs_total{result}                  intact | repaired | failed
    spk_satellite_store_bytes{area} / _current_tree_bytes / _trees   on disk
    spk_satellite_store_gc_freed_bytes_total / _store_over_cap      store GC passes
    spk_satellite_script_runs_started_total / _finished_total{exit_code} / _refused_total
    spk_satellite_script_runs_recorded_total{sandboxed} / _stopped_total{limit}
    spk_satellite_script_run_duration_seconds / _peak_memory_bytes   histograms

A hash label is fine here (one series per agent, replaced on a flip); the core never has one.
Script runs are separate processes (`spk-satellite run`): they count into a small file in the
data dir (satellite/run_stats.py) that this registry reads at scrape time, and append a record
to runs.jsonl (satellite/run_outcome.py) that the agent follows into `script_run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

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

from satellite.run_outcome import STOPPERS
from satellite.run_stats import RunStats, read_run_stats
from satellite.sync import Outcome, ReconcileResult, StoreGcReport
from shared.errors import IntegrityError, UnsafeWheel

SYNC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0)
MEMORY_BUCKETS = tuple(float(1 << n) for n in range(24, 36))  # 16 MiB .. 32 GiB
AREAS = ("blobs", "pkgs", "trees")


def _number(value: object) -> float | None:
    """A JSON number (not a bool) of a run record, or None (a line written by hand, say)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


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
        self.pulled_wheel_bytes = Counter(
            "spk_satellite_pulled_wheel_bytes",
            "Bytes of the blobs the pulls produced (pulled_bytes counts the wire: the difference"
            " is what patches saved).",
            registry=r,
        )
        self.blobs_by_url = Counter(
            "spk_satellite_blobs_by_url",
            "Of the blobs pulled: fetched from a URL (object store, CDN), not from the core.",
            registry=r,
        )
        self.url_fallbacks = Counter(
            "spk_satellite_url_fallbacks",
            "Blob URL fetches that failed and fell back to the core.",
            registry=r,
        )
        self.patches_used = Counter(
            "spk_satellite_patches_used",
            "Of the blobs pulled: made from a binary patch and a version held.",
            registry=r,
        )
        self.patch_fallbacks = Counter(
            "spk_satellite_patch_fallbacks",
            "Patches that failed (fetch, apply or verify): the whole blob was pulled instead.",
            registry=r,
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
        self.store_gc_freed = Counter(
            "spk_satellite_store_gc_freed_bytes",
            "Bytes store GC removed from blobs/ and pkgs/ (and trees evicted for the byte cap).",
            registry=r,
        )
        self.store_over_cap = Gauge(
            "spk_satellite_store_over_cap",
            "1 when the last store GC pass found that what must stay (the current tree, pinned"
            " runs) alone exceeds --max-store-bytes.",
            registry=r,
        )
        # ---- script runs, from the records runs append to runs.jsonl (run_outcome.py) ----
        self.script_runs_recorded = Counter(
            "spk_satellite_script_runs_recorded",
            "Script runs recorded in the run log while the agent ran, by whether a sandbox policy"
            " applied.",
            ["sandboxed"],
            registry=r,
        )
        self.script_runs_stopped = Counter(
            "spk_satellite_script_runs_stopped",
            "Script runs ended by a limit: timeout, cpu, memory, processes.",
            ["limit"],
            registry=r,
        )
        self.script_run_duration = Histogram(
            "spk_satellite_script_run_duration_seconds",
            "Wall time of recorded script runs.",
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.script_run_memory = Histogram(
            "spk_satellite_script_run_peak_memory_bytes",
            "The largest resident set of any process of a recorded script run.",
            buckets=MEMORY_BUCKETS,
            registry=r,
        )
        for outcome in (o for o in Outcome if o not in (Outcome.REPAIRED, Outcome.INTACT)):
            self.syncs.labels(outcome.value)
        for result in ("intact", "repaired", "failed"):
            self.drift_repairs.labels(result)
        for sandboxed in ("true", "false"):
            self.script_runs_recorded.labels(sandboxed)
        for limit in STOPPERS:
            self.script_runs_stopped.labels(limit)
        self.stream_connected.set(0)
        self.unserved.set(0)

    def watch_runs(self, data_dir: Path) -> None:
        """Expose the script-run counters kept in `data_dir` (read at each scrape)."""
        self.registry.register(_RunsCollector(lambda: read_run_stats(data_dir)))

    def record(self, result: ReconcileResult, now: float) -> None:
        """Count one reconcile or drift-repair result."""
        self.pulled_blobs.inc(result.blobs_pulled)
        self.pulled_bytes.inc(result.bytes_pulled)
        self.pulled_wheel_bytes.inc(result.wheel_bytes)
        self.blobs_by_url.inc(result.blobs_by_url)
        self.url_fallbacks.inc(result.url_fallbacks)
        self.patches_used.inc(result.patches_used)
        self.patch_fallbacks.inc(result.patch_fallbacks)
        if result.store_gc is not None:
            self.store_gc(result.store_gc)
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

    def store_gc(self, report: StoreGcReport) -> None:
        """Count one store GC pass (after a flip, or on its schedule)."""
        self.store_gc_freed.inc(report.bytes_freed)
        self.store_over_cap.set(1 if report.over_cap else 0)

    def script_run(self, record: Mapping[str, Any]) -> None:
        """Count one run record of runs.jsonl (satellite.run_outcome.follow_run_log's callback)."""
        self.script_runs_recorded.labels("true" if record.get("sandbox") else "false").inc()
        stopped_by = record.get("stopped_by")
        if stopped_by in STOPPERS:
            self.script_runs_stopped.labels(stopped_by).inc()
        duration = _number(record.get("duration_seconds"))
        if duration is not None and duration >= 0:
            self.script_run_duration.observe(duration)
        memory = _number(record.get("peak_memory_bytes"))
        if memory is not None and memory >= 0:
            self.script_run_memory.observe(memory)
