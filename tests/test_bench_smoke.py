"""scripts/bench --smoke: the benchmark still runs end to end (tiny wheels, one round, loopback).

The full bench is not run in CI; this keeps its code paths working: materialise vs pip, a core
install vs pip download from a local pypiserver, pulls and the chunk sweep, the delta through a
counting proxy, fan-out to agents hosted in worker processes, idle subscriptions, the start-up
of a sandboxed run next to an unsandboxed one, and binary deltas with a bounded satellite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.benchlib", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE run" in text
    for figure in (
        "| 1 |",
        "| 2 |",
        "| 3 |",
        "| 4 |",
        "| 5 |",
        "| 6 |",
        "| 7 |",
        "| 8 |",
        "| 9 |",
        "| 10 |",
    ):
        assert figure in text, text
    assert "re-flip to a built tree" in text
    assert "core RSS per idle subscription" in text
    assert 'sandboxed print("hi")' in text and "unsandboxed spk-satellite run" in text
    assert "patch on the wire" in text and "agent with --no-deltas" in text
    assert "satellite store (blobs/ + pkgs/) over 5 upgrades" in text
