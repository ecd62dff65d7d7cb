"""Fault 5: garbage collection racing installs, pulls, flips and script runs.

Satellite, in the style of Nix's gc-concurrent test: one "agent" thread does what the
reconciler's single worker does (assemble, flip, retire, tree GC with grace 0, sometimes a
drift-repair rebuild of `current`), several "run" threads pin `current` the way
`spk-satellite run` does and read every file of the pinned tree, and an observer checks
`current` without pause. A barrier starts every round of every thread at the same instant, so
GC, flips and pins collide as often as possible. Invariants: a pinned tree is never missing a
file while pinned, `current` always resolves, and once the pins are gone GC leaves only `current`.

Core: blob GC (grace 0, keep 0) runs in a loop while installs publish new sets and a real
satellite pulls each of them; a checker asserts the desired manifest's blobs are all in the store
whenever that manifest is desired, and the satellite ends on the last set.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from satellite.runner import _pin
from satellite.store import SatelliteStore
from shared.errors import FailedPrecondition
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.stress import harness
from tests.stress.harness import pick

ROUNDS = pick(150, 3000)
RUNNERS = 3
CORE_ROUNDS = pick(3, 12)


def _manifests(store: SatelliteStore, wheel_dir: Path) -> list[tuple[Manifest, dict[str, str]]]:
    """Three manifests over five packages, every package unpacked into the store."""
    names = [f"gc-p{i}" for i in range(5)]
    out = []
    for k, version in enumerate(["1.0", "2.0", "3.0"]):
        built = harness.build_set(wheel_dir / version, names[k : k + 3], version, 25, 1500, seed=k)
        entries = []
        for wheel in built.wheels:
            data = wheel.read_bytes()
            name, ver = wheel.name.split("-")[:2]
            entry = ManifestEntry(name, ver, wheel.name, hashlib.sha256(data).hexdigest(),
                                  len(data), True)  # fmt: skip
            store.pkgs.unpack(entry, wheel)
            entries.append(entry)
        manifest = Manifest.build(entries, TargetEnvironment("3.11"), sequence=k + 1)
        out.append((manifest, harness.expected_files(built.wheels)))
    return out


def test_tree_gc_never_removes_a_pinned_or_current_tree(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "sat")
    sets = _manifests(store, tmp_path / "wheels")
    expected = {m.lockfile_hash: files for m, files in sets}
    store.assemble_tree(sets[0][0])
    store.flip_current(sets[0][0].lockfile_hash)

    barrier = threading.Barrier(1 + RUNNERS)
    stop = threading.Event()
    violations: list[str] = []
    counts: Counter[str] = Counter()
    counts["runs refused: tree collected before the pin"] = 0  # reported even when none were
    lock = threading.Lock()

    def note(key: str, problem: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if problem is not None:
                violations.append(problem)

    def agent() -> None:
        rng = random.Random(1)
        for rnd in range(ROUNDS):
            barrier.wait()
            manifest = sets[rng.randrange(len(sets))][0]
            wanted = manifest.lockfile_hash
            if rng.random() < 0.1 and store.current_hash() is not None:
                store.assemble_tree(store.tree_manifest(store.current_hash() or ""), replace=True)
                note("drift repairs of current")
            if not store.has_tree(wanted):
                store.assemble_tree(manifest)
            store.flip_current(wanted)
            store.retire_others(time.time())
            removed = store.gc_trees(0, time.time() + 1)
            note("trees collected", None) if removed else note("gc passes that kept a pinned tree")
            counts["rounds"] = rnd + 1
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
                    # Flipped and collected between resolve and pin: the run is refused
                    # ("try again"), the documented outcome, and nothing was read.
                    note("runs refused: tree collected before the pin")
                    continue
                note("runs")
                if held is not None:  # the previous run ends now, one round after it began
                    held[0].close()
                    held = None
                problem = harness.read_problem(pin.site, expected[pin.lockfile_hash])
                if problem is not None:
                    note("read errors", f"pinned {pin.lockfile_hash[:12]}: {problem}")
                if rng.random() < 0.5:
                    held = (stack, pin)  # keep it pinned across the next flip and GC
                else:
                    stack.close()
        except threading.BrokenBarrierError:
            pass
        finally:
            if held is not None:
                held[0].close()

    def observer() -> None:
        while not stop.is_set():
            if store.current_hash() is None:
                note("current checks", "current did not resolve")
            else:
                counts["current checks"] += 1
            time.sleep(0.0002)  # a busy loop would starve the others of the GIL

    threads = [threading.Thread(target=agent), threading.Thread(target=observer)]
    threads += [threading.Thread(target=runner, args=(i,)) for i in range(RUNNERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    current = store.current_hash()
    store.retire_others(time.time())
    store.gc_trees(0, time.time() + 1)
    leaked = [h for h in store.trees.hashes() if h != current]
    violations += [f"tree {h[:12]} survived GC with no pin" for h in leaked]
    violations += [f"final: {p}" for p in store.verify_tree(current or "")]
    harness.record("gc_race_satellite", runners=RUNNERS, **counts, violations=len(violations))
    assert not violations, "\n".join(violations[:20])
    assert counts["gc passes that kept a pinned tree"] > 0, "no GC pass ever met a pinned tree"


def test_core_blob_gc_never_deletes_a_desired_blob(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    names = ["gcc-a", "gcc-b"]
    sets = [
        harness.build_set(wheel_dir, names, f"1.{r}", 30, 2000, seed=r).pins
        for r in range(CORE_ROUNDS)
    ]
    core = CoreProcess(tmp_path / "core")
    core.extra_args = ["--gc-keep", "0", "--gc-grace-hours", "0", "--gc-interval-hours", "0"]
    core.start()
    stop = threading.Event()
    violations: list[str] = []
    counts: Counter[str] = Counter()
    sat = SatelliteProcess(core, "sat-gc", tmp_path, "--retry-base", "0.2", "--retry-cap", "1")
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        desired = harness.install(admin, sets[0])
        sat.register().start()

        def blobs_present(lockfile_hash: str) -> list[str]:
            req = apb.AdminGetManifestRequest(lockfile_hash=lockfile_hash)
            entries = admin.GetManifest(req).entries
            root = core.data_dir / "blobs"
            return [
                e.sha256 for e in entries if not (root / e.sha256[:2] / f"{e.sha256}.whl").exists()
            ]

        def gc_loop() -> None:
            while not stop.is_set():
                try:
                    run = admin.GcBlobs(apb.GcBlobsRequest(dry_run=False))
                    counts["gc passes"] += 1
                    counts["blobs deleted"] += run.deleted
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        violations.append(f"GcBlobs: {exc.code()}: {exc.details()}")
                    counts["gc passes refused (install running)"] += 1
                time.sleep(0.005)

        def checker() -> None:
            while not stop.is_set():
                wanted = admin.GetInstallState().lockfile_hash
                missing = blobs_present(wanted)
                counts["desired-blob checks"] += 1
                if missing and admin.GetInstallState().lockfile_hash == wanted:
                    violations.append(f"desired {wanted[:12]} lost blobs {missing}")

        workers = [threading.Thread(target=gc_loop), threading.Thread(target=checker)]
        for w in workers:
            w.start()
        try:
            for pins in sets[1:]:
                admin.SetPackages(apb.SetPackagesRequest(
                    packages=[apb.PackageSpec(name=n, version=v) for n, v in pins]))  # fmt: skip
                while True:  # GC and installs exclude each other: a refusal means retry
                    try:
                        admin.InstallNow(apb.InstallNowRequest())
                        break
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            raise
                        counts["installs refused (GC pass running)"] += 1
                        time.sleep(0.01)
                state = eventually(lambda: (s := admin.GetInstallState()).status
                                   != apb.INSTALL_STATUS_INSTALLING and s, timeout=120)  # fmt: skip
                if state.status != apb.INSTALL_STATUS_READY:
                    violations.append(f"install failed under GC: {state.error}")
                    continue
                desired = state.lockfile_hash
                counts["installs"] += 1
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)

        def synced() -> bool:
            row = harness.fleet(admin)[sat.name]
            return row.status == "ready" and sat.current() == desired

        eventually(synced, timeout=120)
        violations += [f"final desired lost {m}" for m in blobs_present(desired)]
    finally:
        sat.stop()
        core.stop()
    harness.record("gc_race_core", **counts, violations=len(violations))
    assert not violations, "\n".join(violations[:20])
    assert counts["gc passes"] > 0 and counts["blobs deleted"] > 0, dict(counts)
    assert os.environ.get("SPK_STRESS_FIGURES") is None or counts["installs"] == CORE_ROUNDS - 1
