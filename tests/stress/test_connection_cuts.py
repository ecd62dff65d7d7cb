"""Fault 2: the link between agent and core is cut at random offsets in the middle of blobs.

A TcpProxy between a real agent and the real core drops every connection whenever its downstream
byte count passes one of a set of random offsets. The agent must resume each blob from the
verified size of its partial, so what crosses the link beyond the blobs' own bytes (re-sent data
plus gRPC framing, manifests and reconnects) stays under 10% of the total. A satellite pulling
the same set without cuts gives the protocol overhead for comparison.

What a cut costs is the message in flight on each open stream (the client keeps whole messages
only; the core sends 1 MiB ones, its fastest size): ~0.4 MB per cut here. So the re-sent share
depends on how often the link drops; these runs cut once per 12 MiB on average.

The link is throttled to 32 MiB/s, slower than the agent writes, as a real network is: on raw
loopback the core outruns the agent and whatever sits in the agent's socket buffers when the
link drops (megabytes) is lost too. The long mode measures that case as well, for the record.
"""

from __future__ import annotations

import random
from pathlib import Path

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness
from tests.stress.harness import pick
from tests.tcp_proxy import TcpProxy
from tests.wheelfactory import WheelSpec, build_wheel

ROUNDS = pick(1, 5)
LINK_RATE = 32 << 20  # bytes/s
CUTS_PER_ROUND = pick(2, 8)
WHEELS = pick(3, 6)
WHEEL_MIB = pick(8, 16)


def _pull_through_proxy(
    core: CoreProcess, tmp_path: Path, name: str, wanted: str, cuts: list[int], rate: int
) -> tuple[int, int]:
    """(bytes that reached the agent, connections cut) for a fresh satellite syncing `wanted`."""
    proxy = TcpProxy(core.port, rate=rate)
    proxy.cut_at(cuts)
    sat = SatelliteProcess(core, name, tmp_path).register()
    sat.target = proxy.target
    try:
        sat.start()

        def synced() -> bool:
            row = harness.fleet(core.admin())[name]
            return row.status == "ready" and sat.current() == wanted

        eventually(synced, timeout=180, interval=0.1)
        return proxy.bytes_down - proxy.undelivered, proxy.cuts
    finally:
        sat.stop()
        proxy.close()


def test_cut_connections_resume_from_the_verified_offset(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(11)
    wheels = [
        build_wheel(
            WheelSpec(
                f"cut-w{i}", "1.0", files={f"cut_w{i}/data.bin": rng.randbytes(WHEEL_MIB << 20)}
            ),
            wheel_dir,
        )
        for i in range(WHEELS)
    ]
    total = sum(w.stat().st_size for w in wheels)
    core = CoreProcess(tmp_path / "core").start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        wanted = harness.install(admin, [(f"cut-w{i}", "1.0") for i in range(WHEELS)])
        baseline, _ = _pull_through_proxy(core, tmp_path, "sat-nocut", wanted, [], LINK_RATE)
        rounds = []
        for r in range(ROUNDS):
            offsets = sorted(rng.randrange(1, total) for _ in range(CUTS_PER_ROUND))
            pulled = _pull_through_proxy(core, tmp_path, f"sat-cut{r}", wanted, offsets, LINK_RATE)
            rounds.append(pulled)
        unthrottled = []
        for r in range(ROUNDS if harness.LONG else 0):
            offsets = sorted(rng.randrange(1, total) for _ in range(CUTS_PER_ROUND))
            down, _ = _pull_through_proxy(core, tmp_path, f"sat-raw{r}", wanted, offsets, 0)
            unthrottled.append(down - total)
    finally:
        core.stop()

    excess = [down - total for down, _ in rounds]
    worst = max(excess) / total
    harness.record(
        "connection_cuts",
        rounds=ROUNDS,
        cuts_per_round=CUTS_PER_ROUND,
        cuts_made=sum(c for _, c in rounds),
        blob_bytes=total,
        link_rate_mib_s=LINK_RATE >> 20,
        blobs=WHEELS,
        baseline_overhead_bytes=baseline - total,
        excess_bytes=excess,
        excess_pct_worst=round(100 * worst, 2),
        excess_pct_mean=round(100 * sum(excess) / len(excess) / total, 2),
        resent_per_cut_bytes=round(
            (sum(excess) - len(excess) * (baseline - total)) / max(1, sum(c for _, c in rounds))
        ),
        violations=sum(1 for e in excess if e >= 0.1 * total),
        unthrottled_excess_pct=[round(100 * e / total, 1) for e in unthrottled],
    )
    assert all(c == CUTS_PER_ROUND for _, c in rounds), "every planned cut must have happened"
    assert worst < 0.10, f"{worst:.1%} of the blob bytes crossed the link again"
