"""Figure 8 (issue 13): the fleet at scale on this 2-core machine.

fan-out     1,000 agents (hosted in worker processes, each its own data dir and token) on
            one core; a ~1 MiB change; time from install ready to each agent's READY
storm       the same core SIGKILLed and started again: time until every agent is
            re-subscribed and on the desired hash, peak re-subscriptions per second
two         the same fan-out with two instances behind nginx (contrib/nginx/spk-core.conf),
            sharing Postgres, blobs in the database backend
cost        the core's CPU seconds per fan-out and per MB served, RSS per subscription:
            the inputs of docs/scale.md's model
"""

from __future__ import annotations

import base64
import itertools
import os
import subprocess
import time
from pathlib import Path

from scripts.benchlib.common import Bench, Row, median, rss_kib
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.fanout import _one_change, start_agents
from scripts.benchlib.workload import Workload, pin_of
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop_agents(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fan_out_rows(
    bench: Bench, label: str, rounds: list[tuple[float, float, float | None, int, str]], n: int
) -> None:
    maxes = [r[2] for r in rounds]
    med_max = median(maxes) if None not in maxes else None
    missing = sum(r[3] for r in rounds)
    bench.add(
        Row(
            "8",
            f"{label}: 1 MiB change to {n} agents, all READY (max)",
            med_max,
            target="<= 30 s",
            met=med_max is not None and med_max <= 30.0,
            note=f"p50 {median([r[0] for r in rounds]):.2f} s, p99"
            f" {median([r[1] for r in rounds]):.2f} s; medians of {len(rounds)} installs;"
            f" {missing} agent(s) never reported",
        )
    )
    bench.notes.append(
        f"figure 8 {label} rounds: "
        + "; ".join(f"round {i + 1}: {r[4]}" for i, r in enumerate(rounds))
    )


def _connected(core: BenchCore) -> int:
    return sum(1 for s in core.admin().ListSatellites().satellites if s.connected)


def _storm(bench: Bench, core: BenchCore, n: int, target: str) -> None:
    """SIGKILL the core, start it again; every agent back on its stream and hash."""
    assert core.proc is not None
    core.proc.kill()
    core.proc.wait()
    killed = time.monotonic()
    core.start()
    samples: list[tuple[float, int]] = []
    deadline = killed + 300
    while time.monotonic() < deadline:
        count = _connected(core)
        samples.append((time.monotonic(), count))
        if count >= n:
            break
        time.sleep(0.25)
    back = samples[-1][0] - killed
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples) if b[0] > a[0]]
    rows = core.admin().ListSatellites().satellites
    on_target = sum(1 for s in rows if s.current_hash == target and s.connected)
    bench.add(
        Row(
            "8",
            f"reconnect storm: {n} agents re-subscribed after a core SIGKILL + restart",
            back,
            "s",
            note=f"peak {max(rates, default=0):.0f} re-subscriptions/s;"
            f" {samples[-1][1]} of {n} connected, {on_target} on the desired hash",
        )
    )


def run(bench: Bench, work: Workload, index: PackageIndex) -> None:
    workers, per = (2, 6) if bench.smoke else (8, 125)
    n = workers * per
    rounds = 1 if bench.smoke else min(bench.rounds, 3)
    print(f"figure 8: fan-out to {n} agents, reconnect storm, two instances", flush=True)
    home = bench.scratch("scale")
    core = BenchCore(home / "core").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        core.configure(index.url)
        core.set_packages([pin_of(work.tiny)])
        base, _ = core.install()
        idle = rss_kib(core.pid)
        procs = start_agents(bench, core, core.target, home, base, workers, per, "scale")
        loaded = rss_kib(core.pid)
        cpu_before = _cpu_seconds(core.pid)
        results = [_one_change(core, procs, pin_of(w), work) for w in work.changes[:rounds]]
        cpu = (_cpu_seconds(core.pid) - cpu_before) / rounds
        _fan_out_rows(bench, "one core", results, n)
        # The control cost alone: a change of a few KB (no bytes worth counting to serve).
        small = build_wheel(WheelSpec("spkbench-small", "1.0"), work.index_dir)
        cpu_before = _cpu_seconds(core.pid)
        _one_change(core, procs, pin_of(small), work)
        control = _cpu_seconds(core.pid) - cpu_before
        served_mb = n * work.changes[0].stat().st_size / 1e6
        bench.add(
            Row(
                "8",
                f"core CPU per fan-out of the 1 MiB change to {n} agents (all its RPCs)",
                cpu,
                "s",
                note=f"a {small.stat().st_size / 1000:.0f} kB change: {control:.2f} s (control"
                f" only); so bytes cost {(cpu - control) / served_mb * 1000:.2f} ms per MB"
                f" served; RSS {(loaded - idle) / n:.1f} KiB per agent connection",
            )
        )
        last = results[-1][4]
        target = core.admin().GetInstallState().lockfile_hash
        _storm(bench, core, n, target)
        bench.notes.append(f"figure 8: last one-core round before the storm: {last}")
    finally:
        _stop_agents(procs)
        core.stop()
    _two_instances(bench, work, index, workers, per, rounds)


def _two_instances(
    bench: Bench, work: Workload, index: PackageIndex, workers: int, per: int, rounds: int
) -> None:
    from tests.nginx_process import Nginx
    from tests.storage_servers import FreshPostgres

    home = bench.scratch("scale-two")
    env = {"SPK_SECRET_KEY": base64.b64encode(os.urandom(32)).decode()}
    with FreshPostgres() as pg:
        env["SPK_DATABASE_URL"] = pg.url
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the bench cores and the key export read them
        cores = [BenchCore(home / f"core-{i}").start() for i in range(2)]
        lb: Nginx | None = None
        procs: list[subprocess.Popen[str]] = []
        try:
            lb = Nginx(home, lb_upstreams=[c.target for c in cores]).start()
            core = cores[0]
            core.configure(index.url)
            core.set_packages([pin_of(work.tiny)])
            base, _ = core.install()
            procs = start_agents(bench, core, lb.grpc_target, home, base, workers, per, "scale")
            results = [_one_change(core, procs, pin_of(w), work) for w in work.changes[:rounds]]
            _fan_out_rows(bench, "two instances behind nginx", results, workers * per)
        finally:
            _stop_agents(procs)
            for c in cores:
                c.stop()
            if lb is not None:
                lb.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
