"""Satellite store GC (issue 17) under the same faults as tree GC: races and SIGKILL.

1. Races: one "agent" thread does what the reconcile worker does, in its order (materialise the
   packages a manifest needs, re-pulling what GC removed; assemble; flip; retire; tree and store
   GC with grace 0 and a byte cap that forces evictions), while "run" threads pin `current` and
   read every file of the pinned tree, all released together by a barrier each round.
   Invariants: a pinned tree never misses a file, `current` always resolves, and at the end the
   store holds what `current` needs and verifies.
2. SIGKILL during a store GC pass (a child process over a copy of a store full of garbage), at a
   random moment within the pass's measured length: the next start's cleanup leaves no temp
   entry, `current` verifies against the wheels' own hashes, and a full pass then completes.
3. A crash-looping agent converges: killed as soon as the first group of a big batch is
   published, the packages of that group survive the kill and the restarted agent converges.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from satellite.runner import _pin
from satellite.store import SatelliteStore
from satellite.sync import StoreGcPolicy
from satellite.sync.materialiser import PUBLISH_GROUP
from shared.errors import FailedPrecondition
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness
from tests.stress.harness import pick

ROUNDS = pick(80, 1500)
RUNNERS = 3
KILLS = pick(8, 100)
VERSIONS = 6


def _entry(wheel: Path) -> tuple[ManifestEntry, bytes]:
    data = wheel.read_bytes()
    name, version = wheel.name.split("-")[:2]
    sha = hashlib.sha256(data).hexdigest()
    return ManifestEntry(name, version, wheel.name, sha, len(data), True), data


def _sets(wheel_dir: Path) -> list[tuple[Manifest, dict[str, bytes], dict[str, str]]]:
    """VERSIONS manifests: `gs-a` changes every version, `gs-b` every other, `gs-c` never."""
    out = []
    for k in range(VERSIONS):
        wheels = [
            *harness.build_set(wheel_dir, ["gs-a"], f"1.{k}", 20, 1500, seed=0).wheels,
            *harness.build_set(wheel_dir, ["gs-b"], f"2.{k // 2}", 20, 1500, seed=0).wheels,
            *harness.build_set(wheel_dir, ["gs-c"], "3.0", 20, 1500, seed=0).wheels,
        ]
        pairs = [_entry(w) for w in wheels]
        manifest = Manifest.build([e for e, _ in pairs], TargetEnvironment("3.11"), sequence=k + 1)
        blobs = {e.sha256: d for e, d in pairs}
        out.append((manifest, blobs, harness.expected_files(wheels)))
    return out


def _materialise(store: SatelliteStore, manifest: Manifest, blobs: dict[str, bytes]) -> None:
    """What a reconcile does, minus the network: pull what is missing, unpack, assemble."""
    for entry in manifest.entries:
        if not store.has_pkg(entry.sha256):
            if not store.has_blob(entry.sha256):
                writer = store.open_blob_writer(entry.sha256, entry.size)
                writer.write(blobs[entry.sha256])
                writer.commit()
            store.unpack(entry)
    if not store.has_tree(manifest.lockfile_hash):
        store.assemble_tree(manifest)


def test_store_gc_never_removes_what_current_or_a_pinned_run_uses(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "sat")
    sets = _sets(tmp_path / "wheels")
    expected = {m.lockfile_hash: files for m, _, files in sets}
    _materialise(store, sets[0][0], sets[0][1])
    store.flip_current(sets[0][0].lockfile_hash)
    one_set = store.gc_store(StoreGcPolicy(), 0, time.time()).store_bytes  # blobs + packages
    policy = StoreGcPolicy(keep_bases=1, max_store_bytes=2 * one_set)

    barrier = threading.Barrier(1 + RUNNERS)
    stop = threading.Event()
    violations: list[str] = []
    counts: Counter[str] = Counter()
    counts["runs refused: tree collected before the pin"] = 0
    lock = threading.Lock()

    def note(key: str, problem: str | None = None, n: int = 1) -> None:
        with lock:
            counts[key] += n
            if problem is not None:
                violations.append(problem)

    def agent() -> None:
        rng = random.Random(7)
        try:
            for rnd in range(ROUNDS):
                barrier.wait()
                manifest, blobs, _ = sets[rng.randrange(len(sets))]
                _materialise(store, manifest, blobs)
                store.flip_current(manifest.lockfile_hash)
                store.retire_others(time.time())
                report = store.gc_store(policy, 0, time.time() + 1)
                note("blobs removed", n=report.blobs_removed)
                note("packages removed", n=report.pkgs_removed)
                note("trees evicted under the cap", n=report.trees_evicted)
                if report.over_cap:
                    note("passes over the cap (pinned trees)")
                counts["rounds"] = rnd + 1
        finally:
            stop.set()
            barrier.abort()

    def runner(seed: int) -> None:
        rng = random.Random(seed)
        held = None
        try:
            while not stop.is_set():
                barrier.wait()
                current = store.current_hash()
                if current is None:
                    note("runs", "a run found no current tree")
                    continue
                stack = contextlib.ExitStack()
                try:
                    pin = _pin(stack, store, current)
                except FailedPrecondition:
                    note("runs refused: tree collected before the pin")
                    continue
                note("runs")
                if held is not None:
                    held.close()
                    held = None
                problem = harness.read_problem(pin.site, expected[pin.lockfile_hash])
                if problem is not None:
                    note("read errors", f"pinned {pin.lockfile_hash[:12]}: {problem}")
                if rng.random() < 0.5:
                    held = stack  # still pinned across the next flip and GC
                else:
                    stack.close()
        except threading.BrokenBarrierError:
            pass
        finally:
            if held is not None:
                held.close()

    threads = [threading.Thread(target=agent)]
    threads += [threading.Thread(target=runner, args=(i,)) for i in range(RUNNERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    current = store.current_hash()
    assert current is not None
    report = store.gc_store(policy, 0, time.time() + 1)
    violations += [f"final: {p}" for p in store.verify_tree(current)]
    site = store.tree_site(current)
    violations += [
        f"final (wheel hashes): {p}" for p in harness.tree_problems(site, expected[current])
    ]
    if report.store_bytes > policy.max_store_bytes:
        violations.append(f"store {report.store_bytes} B over the cap {policy.max_store_bytes}")
    harness.record("store_gc_race", runners=RUNNERS, **counts, violations=len(violations))
    assert not violations, "\n".join(violations[:20])
    assert counts["packages removed"] > 0 and counts["blobs removed"] > 0, dict(counts)


_GC_CHILD = """
import sys, time
from satellite.store import SatelliteStore
from satellite.sync import StoreGcPolicy
store = SatelliteStore(sys.argv[1])
print("start", flush=True)
t = time.monotonic()
store.gc_store(StoreGcPolicy(keep_bases=1), 0, time.time() + 1)
print(f"done {time.monotonic() - t:.4f}", flush=True)
"""


def _gc_child(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _GC_CHILD, str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_sigkill_during_store_gc_leaves_a_verified_tree(tmp_path: Path) -> None:
    template = SatelliteStore(tmp_path / "template")
    sets = _sets(tmp_path / "wheels")
    for manifest, blobs, _ in sets:  # every version unpacked, each one's tree retired
        _materialise(template, manifest, blobs)
        template.flip_current(manifest.lockfile_hash)
        template.retire_others(time.time() - 3600)
    current, _, files = sets[-1]

    # The pass's length on this machine, to aim the kills inside it.
    probe = tmp_path / "probe"
    shutil.copytree(template.root, probe, symlinks=True)
    child = _gc_child(probe)
    out, _ = child.communicate(timeout=120)
    took = float(out.split("done")[1])
    removed_all = not any(
        SatelliteStore(probe).has_pkg(e.sha256) for m, _, _ in sets[:-2] for e in m.entries
        if e.sha256 not in {x.sha256 for x in current.entries}
    )  # fmt: skip
    assert removed_all, "the probe pass did not collect the old packages"

    packages = len(list((template.root / "pkgs").iterdir()))
    rng = random.Random(3)
    counts: Counter[str] = Counter()
    violations: list[str] = []
    for kill in range(KILLS):
        data = tmp_path / f"kill-{kill}"
        shutil.copytree(template.root, data, symlinks=True)
        child = _gc_child(data)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "start"
        time.sleep(rng.uniform(0, took * 1.2))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        counts["killed mid-pass" if child.returncode == -signal.SIGKILL else "finished"] += 1
        store = SatelliteStore(data)
        if len(list((data / "pkgs").iterdir())) < packages:
            counts["kills after the pass had removed something"] += 1
        with store.acquire_agent_lock():
            store.cleanup_temp()
        leftovers = harness.temp_leftovers(data)
        violations += [f"kill {kill}: leftover {p}" for p in leftovers]
        if store.current_hash() != current.lockfile_hash:
            violations.append(f"kill {kill}: current is {store.current_hash()}")
            continue
        violations += [f"kill {kill}: {p}" for p in store.verify_tree(current.lockfile_hash)]
        site = store.tree_site(current.lockfile_hash)
        violations += [f"kill {kill}: {p}" for p in harness.tree_problems(site, files)]
        store.gc_store(StoreGcPolicy(keep_bases=1), 0, time.time() + 1)  # completes now
        violations += [
            f"kill {kill} then GC: {p}" for p in store.verify_tree(current.lockfile_hash)
        ]
        shutil.rmtree(data, ignore_errors=True)  # root: the read-only bits do not stop it
    harness.record("store_gc_sigkill", kills=KILLS, pass_seconds=round(took, 4), **counts,
                   violations=len(violations))  # fmt: skip
    assert not violations, "\n".join(violations[:20])


def test_a_kill_during_a_big_batch_keeps_the_published_groups(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    count = 2 * PUBLISH_GROUP + 6
    names = [f"batch-{i:02d}" for i in range(count)]
    pins = harness.build_set(wheel_dir, names, "1.0", 12, 3000, seed=1).pins
    core = CoreProcess(tmp_path / "core").start()
    sat = SatelliteProcess(core, "sat-batch", tmp_path, "--no-drift-watch")
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        desired = harness.install(admin, pins)
        sat.register().start()
        store = SatelliteStore(sat.data_dir)

        def published() -> int:
            root = sat.data_dir / "pkgs"
            return len(list(root.glob("*/.spk-complete"))) if root.is_dir() else 0

        eventually(lambda: published() >= PUBLISH_GROUP, timeout=120, interval=0.005)
        sat.stop(signal.SIGKILL)
        kept = published()
        assert kept >= PUBLISH_GROUP, kept  # the first group survived the kill
        assert store.current_hash() != desired or kept == count
        sat.start()
        eventually(lambda: store.current_hash() == desired, timeout=120)
        assert store.verify_tree(desired) == []
        harness.record("batch_kill", packages=count, survived_the_kill=kept)
    finally:
        sat.stop()
        core.stop()
