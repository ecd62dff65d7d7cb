"""Fault 1: SIGKILL of the agent at random points of a reconcile between two real-size manifests.

A real agent process flips between manifests A and B (Rollback on the core makes the other one
desired). Before a new target is set, the store is randomly thinned so the reconcile has real
work: the old tree evicted (assemble), its own packages discarded (unpack), its own blobs deleted
(download). The agent is then killed at a random moment: half the time uniformly over the
reconcile's expected length, half the time within 20 ms of a chosen phase starting. After every
kill: `current` resolves to a complete tree that matches the wheels' own hashes (our hashing and
store.verify_tree), and the next start removes every temp entry left behind. A reader process
pins and reads the current tree in a loop all along.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from satellite.store import SatelliteStore
from satellite.store.pkgs import remove_dir
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness
from tests.stress.harness import LogTail, pick

KILLS = int(os.environ.get("SPK_STRESS_KILLS", 0)) or pick(20, 200)
PKGS = pick(6, 30)
FILES_PER_PKG = pick(30, 130)
MEAN_FILE = pick(3000, 8000)


def _manifest_blobs(admin: AdminClient, lockfile_hash: str) -> set[str]:
    req = apb.AdminGetManifestRequest(lockfile_hash=lockfile_hash)
    return {e.sha256 for e in admin.GetManifest(req).entries}


def _evict_tree(store: SatelliteStore, lockfile_hash: str) -> None:
    """Delete a non-current tree the way GC does: only while holding its pin exclusively."""
    tree = store.trees.dir(lockfile_hash)
    try:
        fd = os.open(tree / ".spk-pin", os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a reader pass on it to end
        doomed = store.trees.root / f".tmp-evict-{lockfile_hash}"
        os.rename(tree, doomed)
    finally:
        if fd >= 0:
            os.close(fd)
    remove_dir(doomed)


def _thin(store: SatelliteStore, level: int, target_only: set[str]) -> None:
    """Make the next reconcile do more: 1 evict trees, 2 + packages, 3 + blobs."""
    current = store.current_hash()
    if level >= 1:
        for lockfile_hash in store.trees.hashes():
            if lockfile_hash != current:
                _evict_tree(store, lockfile_hash)
    for sha in target_only:
        if level >= 2:
            store.pkgs.discard(sha)
        if level >= 3:
            store.blobs.discard(sha)


def _phase(store: SatelliteStore, target: str) -> str:
    """Where the reconcile was when it died, read from what it left on disk."""
    root = store.root
    if store.current_hash() == target:
        return "after flip (retire, report, GC)"
    if store.trees.has(target):
        return "tree renamed in, current not yet flipped"
    if any(root.glob("trees/.tmp-*")):
        return "assembling the tree"
    if any(root.glob("pkgs/.tmp-*")):
        return "unpacking"
    if any(root.glob("blobs/.partial/*")):
        return "downloading"
    return "before download (start, manifest, checks)"


# Half the kills land at a uniformly random moment; the other half wait for the sign of one
# phase and strike within 20 ms of it, so the short windows (the tree rename, the flip) are hit
# as often as the long ones (unpacking) instead of in proportion to their length.
MARKERS: dict[str, Callable[[SatelliteStore, str], bool]] = {
    "download": lambda s, t: any(s.root.glob("blobs/.partial/*")),
    "unpack": lambda s, t: any(s.root.glob("pkgs/.tmp-*")),
    "assemble": lambda s, t: any(s.root.glob("trees/.tmp-*")),
    "tree renamed in": lambda s, t: s.trees.has(t),
    "flipped": lambda s, t: s.current_hash() == t,
}


def _strike(rng: random.Random, store: SatelliteStore, target: str, expected_s: float) -> str:
    """Sleep until the kill point; returns how it was chosen."""
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0, 1.2 * expected_s))
        return "uniform over the reconcile"
    name = rng.choice(list(MARKERS))
    # No short timeout: the reconcile must be let through to a late phase, or the kills would
    # all land in the long unpack and it would never get there. A phase this reconcile skips
    # (no download when the blobs are there) ends the wait at the flip instead.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if MARKERS[name](store, target):
            if name != "tree renamed in":  # that window is a few ms: strike at once
                time.sleep(rng.uniform(0, 0.02))
            return f"at {name}"
        if store.current_hash() == target:
            return f"at {name} (skipped by this reconcile: killed after the flip)"
        time.sleep(0.002)
    return f"at {name} (not reached in 120 s)"


def _start_reader(
    tmp_path: Path, data_dir: Path, expected: dict[str, dict[str, str]]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    exp = tmp_path / "expected.json"
    exp.write_text(json.dumps(expected))
    result, stop = tmp_path / "reader-result.json", tmp_path / "reader-stop"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.stress.tree_reader", str(data_dir), str(exp),
         str(result), str(stop)],
    )  # fmt: skip
    return proc, result, stop


def test_agent_sigkill_during_reconcile_keeps_current_complete(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(int(os.environ.get("SPK_STRESS_SEED", "7")))
    names = [f"stress-p{i:02d}" for i in range(PKGS)]
    set_a = harness.build_set(wheel_dir, names, "1.0", FILES_PER_PKG, MEAN_FILE, seed=1)
    half = PKGS // 2
    upgraded = harness.build_set(wheel_dir, names[half:], "2.0", FILES_PER_PKG, MEAN_FILE, seed=1)
    set_b = harness.WheelSet(set_a.wheels[:half] + upgraded.wheels)

    core = CoreProcess(tmp_path / "core").start()
    # The drift watcher is the production default but doubles the agent's start and reconcile
    # time on this 2-core machine (inotify over pkgs/), so only the long mode keeps it.
    drift = [] if harness.LONG else ["--no-drift-watch"]
    sat = SatelliteProcess(core, "sat-kill", tmp_path, "--tree-grace", "0", *drift)
    reader = None
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        hash_a = harness.install(admin, set_a.pins)
        hash_b = harness.install(admin, set_b.pins)
        blobs = {hash_a: _manifest_blobs(admin, hash_a), hash_b: _manifest_blobs(admin, hash_b)}
        expected = {
            hash_a: harness.expected_files(set_a.wheels),
            hash_b: harness.expected_files(set_b.wheels),
        }
        other = {hash_a: hash_b, hash_b: hash_a}
        store = SatelliteStore(sat.data_dir)
        log = LogTail(sat.log_path)

        startups: list[float] = []

        def start_until_connected() -> float:
            started = time.monotonic()
            sat.start()
            connected = log.wait_for("connected to core", timeout=60)
            startups.append(connected - started)
            return connected

        def converged(wanted: str) -> bool:
            row = harness.fleet(admin)[sat.name]
            return row.status == "ready" and store.current_hash() == wanted

        # First sync to A, then calibrate on one full reconcile A -> B.
        admin.Rollback(apb.RollbackRequest(lockfile_hash=hash_a))
        sat.register()
        start_until_connected()
        eventually(lambda: converged(hash_a), timeout=120, interval=0.05)
        reader, reader_result, reader_stop = _start_reader(tmp_path, sat.data_dir, expected)
        sat.stop(signal.SIGKILL)
        admin.Rollback(apb.RollbackRequest(lockfile_hash=hash_b))
        connected = start_until_connected()
        eventually(lambda: store.current_hash() == hash_b, timeout=120, interval=0.01)
        full_reconcile = time.monotonic() - connected
        eventually(lambda: converged(hash_b), timeout=60, interval=0.05)

        # The expected length of a reconcile depends on how much was thinned; it is learnt from
        # the agent's own "flipped ... in N ms" lines and bounds the kill points (_strike).
        expected_s = dict.fromkeys(range(4), full_reconcile)
        target, level = hash_b, 3
        phases: Counter[str] = Counter()
        strikes: Counter[str] = Counter()
        levels: Counter[int] = Counter()
        violations: list[str] = []
        leftovers: list[Path] = []
        cleaned = 0
        for kill in range(KILLS):
            sat.stop(signal.SIGKILL)
            if store.current_hash() == target:  # last reconcile finished: go the other way
                target = other[target]
                level = rng.choice([0, 1, 1, 2, 2, 3, 3, 3])
                levels[level] += 1
                _thin(store, level, blobs[target] - blobs[other[target]])
                admin.Rollback(apb.RollbackRequest(lockfile_hash=target))
            start_until_connected()
            # The agent removes leftovers before it connects: every one seen must be gone now.
            still = [p for p in leftovers if os.path.lexists(p)]
            violations += [f"kill {kill}: leftover survived a restart: {p}" for p in still]
            cleaned += len(leftovers) - len(still)
            strikes[_strike(rng, store, target, expected_s[level])] += 1  # the kill point
            sat.stop(signal.SIGKILL)
            took = re.search(r"packages unpacked in (\d+) ms", log.new_text())
            if took:
                expected_s[level] = int(took.group(1)) / 1000
            phases[_phase(store, target)] += 1
            current = store.current_hash()
            if current not in expected:
                violations.append(f"kill {kill}: current resolves to {current!r}")
                continue
            problems = store.verify_tree(current)
            problems += harness.tree_problems(store.tree_site(current), expected[current])
            violations += [f"kill {kill}: {p}" for p in problems[:5]]
            json.loads((sat.data_dir / "state.json").read_text())  # never torn
            leftovers = harness.temp_leftovers(sat.data_dir)

        start_until_connected()
        eventually(lambda: converged(target), timeout=120, interval=0.05)
        sat.stop()
        final_leftovers = harness.temp_leftovers(sat.data_dir)
        violations += [f"after the last sync: leftover {p}" for p in final_leftovers]
        violations += [f"final tree: {p}" for p in store.verify_tree(target)]
        reader_stop.write_text("")
        reader.wait(timeout=60)
        read = json.loads(reader_result.read_text())
        violations += [f"reader: {v}" for v in read["first_violations"]]

        harness.record(
            "agent_kill",
            kill_points=KILLS,
            kills_by_phase=dict(phases),
            kill_points_chosen=dict(strikes),
            reconciles_completed_between_kills=sum(levels.values()),
            thinning_levels=dict(sorted(levels.items())),
            manifest_files=[len(expected[hash_a]), len(expected[hash_b])],
            manifest_bytes=[set_a.total_bytes, set_b.total_bytes],
            packages=PKGS,
            full_reconcile_s=round(full_reconcile, 2),
            agent_start_to_connected_s=round(sum(startups) / len(startups), 2),
            leftovers_removed_by_restart=cleaned,
            reader_passes=read["passes"],
            reader_files_read=read["files_read"],
            reader_pin_retries=read["pin_retries"],
            reader_violations=read["violations"],
            violations=len(violations) + read["violations"] - len(read["first_violations"]),
        )
        assert not violations, "\n".join(violations[:30])
        assert read["passes"] > 0
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
        sat.stop()
        core.stop()
