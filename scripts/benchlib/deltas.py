"""Figure 9: binary deltas between consecutive real wheels; a satellite store that stays bounded.

    pairs    botocore (three patch releases) and two native packages (pydantic-core, numpy),
             fetched once into <cache>/deltas with `pip download --no-deps` (the only PyPI step)
    compute  per pair, in a child process (peak RSS is its own): the core's patch (the code the
             core runs, level 19, window <= 2**27) against the wheel; its time and peak memory
             next to `zstd --long=27 -19 --patch-from` (the CLI the issue quotes); then the
             satellite's apply + sha256 verify of it
    sync     a real core and real agents on loopback: the upgrade of one pair through a patch
             (the patch already computed) next to an agent with --no-deltas pulling the wheel:
             bytes on the wire from ListSatellites, and each agent's own sync duration
    store    one agent through many consecutive upgrades (50 in a full run) of a package whose
             versions share most bytes, with --max-store-bytes: the store's size after each
             sync never passes the cap

`--smoke` builds synthetic pairs (a shared random payload, a changed module) instead of fetching.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from scripts.benchlib.common import PYTHON, Bench, Row, child_env, remove_tree, rss_kib
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import Workload
from tests.core_process import eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess

PAIRS = [
    ("botocore", "1.44.5", "1.44.6"),
    ("botocore", "1.44.6", "1.44.7"),
    ("botocore", "1.44.7", "1.44.8"),
    ("pydantic-core", "2.50.3", "2.50.4"),
    ("pydantic-core", "2.50.4", "2.50.5"),
    ("numpy", "2.4.5", "2.4.6"),
]
SYNC_PAIRS = [("botocore", "1.44.7", "1.44.8"), ("numpy", "2.4.5", "2.4.6")]
TARGET_BOTOCORE = 0.2  # the target: <= 0.2x of the wheel for botocore patch releases
MIB = 1024 * 1024

_COMPUTE = r"""
import hashlib, json, os, sys, time
from shared.zstd_patch import apply_patch, make_patch, patch_base
def status(field):
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
base = patch_base(open(sys.argv[1], "rb").read())  # as the core and the satellite hold it
target = open(sys.argv[2], "rb").read()
loaded = status("VmRSS")
t = time.perf_counter()
patch, window_log = make_patch(base, target, level=int(sys.argv[3]))
compute = time.perf_counter() - t
peak = status("VmHWM")
t = time.perf_counter()
h = hashlib.sha256()
apply_patch(base, [patch[i:i + 262144] for i in range(0, len(patch), 262144)], h.update,
            max_output=len(target))
ok = h.hexdigest() == hashlib.sha256(target).hexdigest()
apply = time.perf_counter() - t
print(json.dumps({"patch": len(patch), "window_log": window_log, "compute": compute,
                  "apply": apply, "loaded_kib": loaded, "peak_kib": peak, "ok": ok}))
"""


def wheels(bench: Bench) -> dict[tuple[str, str], Path]:
    """(name, version) -> wheel of every pair; fetched once, or built for --smoke."""
    if bench.smoke:
        return _smoke_wheels(bench.scratch("delta-pairs"))
    target = bench.cache / "deltas"
    target.mkdir(parents=True, exist_ok=True)
    found: dict[tuple[str, str], Path] = {}
    for name, *versions in PAIRS:
        for version in versions:
            stem = name.replace("-", "_")
            have = sorted(target.glob(f"{stem}-{version}-*.whl"))
            if not have:
                print(f"fetching {name}=={version} into {target} (once)", flush=True)
                argv = [PYTHON, "-m", "pip", "download", "-q", "--isolated", "--no-deps"]
                argv += ["--only-binary=:all:", "-d", str(target), f"{name}=={version}"]
                subprocess.run(argv, check=True, env=child_env())
                have = sorted(target.glob(f"{stem}-{version}-*.whl"))
            found[(name, version)] = have[0]
    return found


def pairs(bench: Bench) -> list[tuple[str, str, str]]:
    return [("smokedelta", "1.0", "1.1"), ("smokedelta", "1.1", "1.2")] if bench.smoke else PAIRS


def _smoke_wheels(out: Path) -> dict[tuple[str, str], Path]:
    from tests.wheelfactory import WheelSpec, build_wheel

    payload = os.urandom(512 * 1024)
    found = {}
    for version in ("1.0", "1.1", "1.2"):
        files = {
            "smokedelta/__init__.py": f"VERSION = {version!r}\n".encode(),
            "smokedelta/data.bin": payload,
        }
        spec = WheelSpec("smokedelta", version, files=files)
        found[("smokedelta", version)] = build_wheel(spec, out)
    return found


def run(bench: Bench, work: Workload, index: PackageIndex) -> None:
    print("figure 9: binary deltas and a bounded satellite store", flush=True)
    have = wheels(bench)
    for wheel in have.values():  # the index serves files written after its start
        dest = index.packages / wheel.name
        if not dest.exists():
            try:
                os.link(wheel, dest)
            except OSError:
                shutil.copyfile(wheel, dest)
    _compute(bench, have)
    sync_pairs = [("smokedelta", "1.0", "1.1")] if bench.smoke else SYNC_PAIRS
    for name, old, new in sync_pairs:
        _sync(bench, work, index, name, have[(name, old)], have[(name, new)])
    _store_bound(bench, index)


def _compute(bench: Bench, have: dict[tuple[str, str], Path]) -> None:
    zstd = shutil.which("zstd")
    scratch = bench.scratch("delta-compute")
    for name, old, new in pairs(bench):
        base, target = have[(name, old)], have[(name, new)]
        size = target.stat().st_size
        out = subprocess.run(
            [PYTHON, "-c", _COMPUTE, str(base), str(target), "19"],
            check=True,
            capture_output=True,
            text=True,
            env=child_env(),
        )
        got = json.loads(out.stdout)
        assert got["ok"], f"{name} {old} -> {new}: the patch did not reproduce the wheel"
        ratio = got["patch"] / size
        cli_size = cli_time = None
        if zstd is not None:
            dest = scratch / "cli.zst"
            start = time.perf_counter()
            argv = [zstd, "-q", "-f", "--long=27", "-19", f"--patch-from={base}"]
            subprocess.run(
                [*argv, str(target), "-o", str(dest)],
                check=True,
                stderr=subprocess.DEVNULL,
            )
            cli_time = time.perf_counter() - start
            cli_size = dest.stat().st_size
        label = f"{name} {old} -> {new}"
        is_boto = name == "botocore"
        bench.add(
            Row(
                "9",
                f"{label}: patch on the wire ({size / 1e6:.1f} MB wheel)",
                got["patch"],
                "bytes",
                "the whole wheel",
                size,
                f"<= {TARGET_BOTOCORE}x" if is_boto else "",
                ratio <= TARGET_BOTOCORE if is_boto else None,
                note=f"{ratio:.3f}x; offered only under 0.5x"
                + ("" if ratio <= 0.5 else ": NOT offered, the whole wheel is pulled")
                + (f"; zstd CLI {cli_size:,} B" if cli_size is not None else ""),
            )
        )
        peak = got["peak_kib"] / 1024
        bench.add(
            Row(
                "9",
                f"{label}: core compute (level 19, window 2**{got['window_log']})",
                got["compute"],
                "s",
                "zstd --long=27 -19 --patch-from" if cli_time is not None else "",
                cli_time,
                note=f"peak RSS {peak:.0f} MiB ({peak - got['loaded_kib'] / 1024:.0f} MiB over"
                " the process with both wheels loaded); one computation per pair, in the"
                " background",
            )
        )
        bench.add(Row("9", f"{label}: satellite apply + sha256 verify", got["apply"], "s"))
    remove_tree(scratch)


def _patch_ready(core: BenchCore, target_sha: str) -> bool:
    db = sqlite3.connect(core.data_dir / "core.sqlite3", timeout=10)
    try:
        row = db.execute(
            "SELECT status FROM deltapatch WHERE target_sha256 = ?", (target_sha,)
        ).fetchone()
    finally:
        db.close()
    return row is not None


def _sync(
    bench: Bench, work: Workload, index: PackageIndex, name: str, old: Path, new: Path
) -> None:
    import hashlib

    from scripts.benchlib.workload import pin_of

    root = bench.scratch(f"delta-sync-{name}")
    core = BenchCore(root / "core").start()
    sats: list[SatelliteProcess] = []
    try:
        core.configure(index.url)
        core.set_packages([pin_of(old)])
        first, _ = core.install()
        patched = SatelliteProcess(core, f"sync-{name}-delta", root, "--no-drift-watch")  # type: ignore[arg-type]
        whole = SatelliteProcess(  # type: ignore[arg-type]
            core, f"sync-{name}-whole", root, "--no-drift-watch", "--no-deltas"
        )
        sats = [patched, whole]
        for sat in sats:
            sat.register().start()
            eventually(lambda s=sat: s.current() == first, timeout=600, interval=0.1)
            sat.stop()
        core.set_packages([pin_of(new)])
        second, _ = core.install()
        target_sha = hashlib.sha256(new.read_bytes()).hexdigest()
        waited = time.perf_counter()
        eventually(lambda: _patch_ready(core, target_sha), timeout=600, interval=0.1)
        waited = time.perf_counter() - waited
        rows = {}
        peaks = {}
        for sat in sats:  # one at a time: the two agents do not share the two cores
            sat.start()
            rows[sat.name] = eventually(
                lambda s=sat: (
                    (r := s.fleet_row()).current_hash == second and r.status == "ready" and r
                ),
                timeout=600,
                interval=0.1,
            )
            assert sat.proc is not None
            peaks[sat.name] = rss_kib(sat.proc.pid, "VmHWM") / 1024
            sat.stop()
    finally:
        for sat in sats:
            sat.stop()
        core.stop()
        remove_tree(root)
    d, w = rows[patched.name], rows[whole.name]
    label = f"{name} {pin_of(old)[1]} -> {pin_of(new)[1]}"
    bench.add(
        Row(
            "9",
            f"upgrade {label}: bytes on the wire (ListSatellites last_pull_bytes)",
            d.last_pull_bytes,
            "bytes",
            "agent with --no-deltas",
            w.last_pull_bytes,
            note=f"{d.last_pull_patches} of {d.last_pull_blobs} blob(s) from a patch; both"
            f" produced {d.last_wheel_bytes:,} B of wheels; the core's background patch was"
            f" ready {waited:.2f} s after `ready`",
        )
    )
    bench.add(
        Row(
            "9",
            f"upgrade {label}: agent's sync (pull or patch, verify, unpack, tree, flip)",
            d.last_duration_ms / 1000,
            "s",
            "agent with --no-deltas, loopback",
            w.last_duration_ms / 1000,
        )
    )
    bench.add(
        Row(
            "9",
            f"upgrade {label}: agent process peak RSS (a fresh agent, this upgrade only)",
            peaks[patched.name],
            "MiB",
            "agent with --no-deltas",
            peaks[whole.name],
            note="the patch is applied with the whole base in memory and a window of"
            " base + target (bounded by --delta-max-window-log)",
        )
    )


def _store_bound(bench: Bench, index: PackageIndex) -> None:
    from tests.wheelfactory import WheelSpec, build_wheel

    upgrades = 5 if bench.smoke else 50
    size = 256 * 1024 if bench.smoke else 2 * MIB
    root = bench.scratch("delta-store")
    payload = os.urandom(size)
    versions = [f"1.{i}" for i in range(upgrades + 1)]
    for i, version in enumerate(versions):
        files = {
            "storebound/__init__.py": f"VERSION = {version!r}\n".encode(),
            "storebound/data.bin": payload[: size - 4096] + os.urandom(4096),  # a changed tail
            "storebound/more.bin": payload[i % 7 :][:4096],
        }
        build_wheel(WheelSpec("storebound", version, files=files), index.packages)
    one = (size + 4096) * 2  # a version's blob + its unpacked package, about
    cap = 4 * one
    core = BenchCore(root / "core").start()
    # Waits for each patch as a host on a slow link does (left to measure loopback, it would
    # rightly pull the wheel while the core computes); figure 9's sync part covers both.
    sat = SatelliteProcess(  # type: ignore[arg-type]
        core,
        "store-bound",
        root,
        "--no-drift-watch",
        "--max-store-bytes",
        str(cap),
        "--delta-wait",
        "30",
    )
    sizes: list[int] = []
    wire = wheels_total = 0
    try:
        core.configure(index.url)
        core.set_packages([("storebound", versions[0])])
        first, _ = core.install()
        sat.register().start()
        eventually(lambda: sat.current() == first, timeout=300, interval=0.1)
        for version in versions[1:]:
            core.set_packages([("storebound", version)])
            wanted, _ = core.install()
            row = eventually(
                lambda w=wanted: (
                    (r := sat.fleet_row()).current_hash == w
                    and r.status == "ready"
                    and sat.current() == w
                    and r
                ),
                timeout=300,
                interval=0.05,
            )
            wire += row.last_pull_bytes
            wheels_total += row.last_wheel_bytes
            time.sleep(0.2)  # the store GC after the flip runs right after the report
            sizes.append(_store_size(sat.data_dir))
    finally:
        sat.stop()
        core.stop()
    remove_tree(root)
    bench.add(
        Row(
            "9",
            f"satellite store (blobs/ + pkgs/) over {upgrades} upgrades: largest",
            max(sizes) / MIB,
            "MiB",
            target=f"<= --max-store-bytes {cap / MIB:.1f} MiB",
            met=max(sizes) <= cap,
            note=f"after each sync: {', '.join(f'{s / MIB:.1f}' for s in sizes[:10])}"
            + (" ..." if len(sizes) > 10 else "")
            + f"; on the wire {wire / MIB:.1f} MiB for {wheels_total / MIB:.1f} MiB of wheels",
        )
    )
    bench.notes.append(
        "figure 9 store sizes (MiB) after each upgrade: "
        + ", ".join(f"{s / MIB:.2f}" for s in sizes)
    )


def _store_size(data_dir: Path) -> int:
    total = 0
    for sub in ("blobs", "pkgs"):
        for dirpath, _, files in os.walk(data_dir / sub):
            if "/.partial" in dirpath or "/.patches" in dirpath:
                continue
            for name in files:
                if name.endswith(".json") or name == ".spk-complete":
                    continue
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    total += os.path.getsize(path)
    return total
