"""Figure 4: many agents (hosted a few processes) subscribed to one core; an install of about
1 MiB; time from "install ready" to each agent's READY. Then core RSS per idle subscription."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from scripts.benchlib.common import PYTHON, Bench, Row, child_env, median, rss_kib
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import Workload, pin_of
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.index_server import PackageIndex
from tests.satellite_process import export_signing_key


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _spawn(module: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        raise RuntimeError(f"worker said {line!r}, expected {word!r} (exit {proc.poll()})")


def start_agents(
    bench: Bench,
    core: BenchCore,
    target: str,
    home: Path,
    base: str,
    workers: int,
    per: int,
    prefix: str,
) -> list[subprocess.Popen[str]]:
    """`workers` processes of `per` agents each, connected to `target`, all on `base`."""
    key = export_signing_key(core, home / "core-key.pem")  # type: ignore[arg-type]
    procs = []
    for w in range(workers):
        specs = []
        for a in range(per):
            name = f"{prefix}-{w}-{a}"
            data_dir = str((bench.agents_dir or home / "agents") / name)
            specs.append({"name": name, "token": core.create_satellite(name), "data_dir": data_dir})
        spec_file = home / f"worker-{w}.json"
        spec_file.write_text(json.dumps(specs))
        procs.append(
            _spawn("scripts.benchlib.fanout_worker", target, str(key), base, str(spec_file))
        )
    for proc in procs:
        _expect(proc, "converged")
    return procs


def run(bench: Bench, work: Workload, index: PackageIndex) -> None:
    workers, per_worker = (2, 3) if bench.smoke else (4, 50)
    subs_workers, per_subs = (2, 10) if bench.smoke else (4, 250)
    agents = workers * per_worker
    print(f"figure 4: fan-out to {agents} agents in {workers} processes", flush=True)
    home = bench.scratch("fanout")
    core = BenchCore(home / "core").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        core.configure(index.url)
        core.set_packages([pin_of(work.tiny)])
        base, _ = core.install()
        procs = start_agents(bench, core, core.target, home, base, workers, per_worker, "fan")

        rounds = [_one_change(core, procs, pin_of(w), work) for w in work.changes]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(60)
        size = work.changes[0].stat().st_size / 2**20
        p50s = [r[0] for r in rounds]
        p99s = [r[1] for r in rounds]
        maxes = [r[2] for r in rounds]
        missing = sum(r[3] for r in rounds)
        med_max = median(maxes) if None not in maxes else None
        notes = "; ".join(f"round {i + 1}: {r[4]}" for i, r in enumerate(rounds))
        bench.add(
            Row("4", f"fan-out of a {size:.2f} MiB change to {agents} agents: p50", median(p50s))
        )
        bench.add(Row("4", "fan-out: p99", median(p99s)))
        bench.add(
            Row(
                "4",
                "fan-out: max (all READY)",
                med_max,
                target="<= 10 s",
                met=med_max is not None and med_max <= 10.0,
                note=f"medians of {len(rounds)} installs; worst max"
                f" {max((m for m in maxes if m is not None), default=0):.2f} s;"
                f" {missing} agent(s) never reported",
            )
        )
        bench.notes.append(f"figure 4 rounds: {notes}")
        _subscriptions(bench, core, home, subs_workers, per_subs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        core.stop()


def _one_change(
    core: BenchCore,
    procs: list[subprocess.Popen[str]],
    change: tuple[str, str],
    work: Workload,
) -> tuple[float, float, float | None, int, str]:
    """Install one ~1 MiB change; (p50, p99, max or None, agents missing, note)."""
    core.set_packages([pin_of(work.tiny), change])
    admin = core.admin()
    admin.InstallNow(apb.InstallNowRequest())
    before_ready = time.time()
    while (state := admin.GetInstallState()).status == apb.INSTALL_STATUS_INSTALLING:
        before_ready = time.time()  # conservative: the last moment it was still installing
        time.sleep(0.005)
    if state.status != apb.INSTALL_STATUS_READY:
        raise RuntimeError(f"fan-out install failed: {state.error}")
    target = str(state.lockfile_hash)
    done: dict[str, float | None] = {}
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{target}\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout is not None
        done.update(json.loads(proc.stdout.readline()))
    latencies = [t - before_ready for t in done.values() if t is not None]
    missing = len(done) - len(latencies)
    rows = admin.ListSatellites().satellites
    ready = sum(1 for s in rows if s.current_hash == target and s.status == "ready")
    worst = max(latencies) if latencies and not missing else None
    p50 = _percentile(latencies, 50)
    p99 = _percentile(latencies, 99)
    note = f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {worst or float('nan'):.2f} s, {ready} ready"
    return p50, p99, worst, missing, note


def _subscriptions(bench: Bench, core: BenchCore, home: Path, workers: int, per: int) -> None:
    total = workers * per
    tokens = [core.create_satellite(f"sub-{i:04d}") for i in range(total)]
    time.sleep(3.0)  # the fan-out agents' streams are gone
    idle = rss_kib(core.pid)
    procs = []
    for w in range(workers):
        path = home / f"subs-{w}.json"
        path.write_text(json.dumps(tokens[w * per : (w + 1) * per]))
        procs.append(_spawn("scripts.benchlib.subs_worker", core.target, str(path)))
    try:
        for proc in procs:
            _expect(proc, "open")
        time.sleep(2.0)
        loaded = rss_kib(core.pid)
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(60)
    per_sub = (loaded - idle) / total
    bench.add(
        Row(
            "4",
            f"core RSS per idle subscription ({total} streams, one connection each)",
            per_sub,
            "KiB",
            target="<= 100 KiB",
            met=per_sub <= 100,
            note=f"core RSS {idle / 1024:.1f} MiB at 0, {loaded / 1024:.1f} MiB at {total}",
        )
    )
