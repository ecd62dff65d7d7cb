"""The agent's metrics, counted from what the agent is handed: reconcile results, store GC
reports and run records of runs.jsonl (satellite/metrics.py; no agent, no disk)."""

from __future__ import annotations

from typing import Any

from satellite.metrics import AgentMetrics
from satellite.run_outcome import STOPPERS
from satellite.sync import Outcome, ReconcileResult, StoreGcReport


def _value(m: AgentMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def test_a_sync_counts_urls_patches_their_fallbacks_and_the_store_gc_after_it() -> None:
    m = AgentMetrics(process=False)
    result = ReconcileResult(
        "a" * 64,
        Outcome.FLIPPED,
        blobs_pulled=5,
        bytes_pulled=40_000,
        wheel_bytes=100_000,
        blobs_by_url=3,
        url_fallbacks=1,
        patches_used=2,
        patch_fallbacks=1,
        duration_ms=1500,
        store_gc=StoreGcReport(blobs_removed=2, bytes_freed=70_000, store_bytes=500_000),
    )
    m.record(result, now=1_800_000_000.0)
    m.record(result, now=1_800_000_001.0)
    assert _value(m, "spk_satellite_pulled_blobs_total") == 10
    assert _value(m, "spk_satellite_pulled_bytes_total") == 80_000  # the wire
    assert _value(m, "spk_satellite_pulled_wheel_bytes_total") == 200_000  # the blobs it made
    assert _value(m, "spk_satellite_blobs_by_url_total") == 6
    assert _value(m, "spk_satellite_url_fallbacks_total") == 2
    assert _value(m, "spk_satellite_patches_used_total") == 4
    assert _value(m, "spk_satellite_patch_fallbacks_total") == 2
    assert _value(m, "spk_satellite_store_gc_freed_bytes_total") == 140_000
    assert _value(m, "spk_satellite_store_over_cap") == 0
    assert _value(m, "spk_satellite_syncs_total", outcome="flipped") == 2


def test_a_repair_counts_its_pulls_and_a_scheduled_store_gc_pass_counts_alone() -> None:
    m = AgentMetrics(process=False)
    repair = ReconcileResult(
        "b" * 64, Outcome.REPAIRED, blobs_pulled=1, blobs_by_url=1, drift_repair=True
    )
    m.record(repair, now=0.0)
    assert _value(m, "spk_satellite_blobs_by_url_total") == 1
    assert _value(m, "spk_satellite_drift_repairs_total", result="repaired") == 1
    assert _value(m, "spk_satellite_store_gc_freed_bytes_total") == 0  # nothing ran yet
    m.store_gc(StoreGcReport(bytes_freed=4096, store_bytes=10, over_cap=True))
    assert _value(m, "spk_satellite_store_gc_freed_bytes_total") == 4096
    assert _value(m, "spk_satellite_store_over_cap") == 1
    m.store_gc(StoreGcReport())
    assert _value(m, "spk_satellite_store_over_cap") == 0


def _record(**fields: Any) -> dict[str, Any]:
    """A runs.jsonl record as RunOutcome.as_dict writes it."""
    record: dict[str, Any] = {
        "script": "/srv/job.py",
        "lockfile_hash": "c" * 64,
        "sandbox": "",
        "started_at_unix": 1_800_000_000.0,
        "duration_seconds": 0.5,
        "exit_code": 0,
        "signal": None,
        "peak_memory_bytes": 20 << 20,
        "cpu_seconds": 0.4,
        "stopped_by": None,
        "limits_hit": [],
    }
    return {**record, **fields}


def test_run_records_count_by_sandbox_and_limit_with_duration_and_memory() -> None:
    m = AgentMetrics(process=False)
    for limit in STOPPERS:  # every limit is exported from the start, at 0
        assert _value(m, "spk_satellite_script_runs_stopped_total", limit=limit) == 0
    m.script_run(_record())
    m.script_run(_record(sandbox="host policy /etc/p.toml", stopped_by="memory", exit_code=1))
    m.script_run(_record(sandbox="host policy /etc/p.toml", stopped_by="timeout", signal=9,
                         duration_seconds=30.0, peak_memory_bytes=3 << 30))  # fmt: skip
    assert _value(m, "spk_satellite_script_runs_recorded_total", sandboxed="false") == 1
    assert _value(m, "spk_satellite_script_runs_recorded_total", sandboxed="true") == 2
    assert _value(m, "spk_satellite_script_runs_stopped_total", limit="memory") == 1
    assert _value(m, "spk_satellite_script_runs_stopped_total", limit="timeout") == 1
    assert _value(m, "spk_satellite_script_runs_stopped_total", limit="cpu") == 0
    assert _value(m, "spk_satellite_script_run_duration_seconds_count") == 3
    assert _value(m, "spk_satellite_script_run_duration_seconds_sum") == 31.0
    assert _value(m, "spk_satellite_script_run_duration_seconds_bucket", le="1.0") == 2
    assert _value(m, "spk_satellite_script_run_peak_memory_bytes_count") == 3
    assert _value(m, "spk_satellite_script_run_peak_memory_bytes_bucket", le="3.3554432e+07") == 2


def test_a_record_written_by_hand_counts_what_it_can_and_labels_nothing_new() -> None:
    m = AgentMetrics(process=False)
    m.script_run({"stopped_by": "the-boss", "duration_seconds": "long", "peak_memory_bytes": True})
    m.script_run({"duration_seconds": -1, "sandbox": ""})
    assert _value(m, "spk_satellite_script_runs_recorded_total", sandboxed="false") == 2
    assert _value(m, "spk_satellite_script_run_duration_seconds_count") == 0
    assert _value(m, "spk_satellite_script_run_peak_memory_bytes_count") == 0
    limits = {
        s.labels["limit"]
        for family in m.registry.collect()
        for s in family.samples
        if s.name == "spk_satellite_script_runs_stopped_total"
    }
    assert limits == set(STOPPERS)
