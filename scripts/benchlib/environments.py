"""Figure 6: one install resolved and published for four environments (CPython 3.11, 3.12, 3.13
on x86-64, 3.12 on aarch64) against the same allowlist for one environment, each round on a
cold core; and the bytes the blob store holds against the sum of the four manifests (the wheels
the environments share are stored once)."""

from __future__ import annotations

import os

from scripts.benchlib.common import Bench, Row, median, remove_tree
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import ENVIRONMENTS, Workload
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.index_server import PackageIndex


def _install(
    bench: Bench, work: Workload, index: PackageIndex, name: str, envs: int
) -> tuple[float, BenchCore]:
    core = BenchCore(bench.scratch(name) / "core").start()
    core.configure(index.url)
    # The default environment becomes the first of ENVIRONMENTS, the rest are added.
    first = ENVIRONMENTS[0]
    target = apb.SetRegistryConfigRequest()
    target.target.python_version, target.target.abi = first[1], "cp" + first[1].replace(".", "")
    target.target.platform = first[2]
    core.admin().SetRegistryConfig(target)
    for env_name, python, platform in ENVIRONMENTS[1:envs]:
        core.add_environment(env_name, python, platform)
    core.set_packages(work.pins)
    os.sync()
    return core.install()[1], core


def run(bench: Bench, work: Workload, index: PackageIndex) -> None:
    count = 1 if bench.smoke else len(ENVIRONMENTS)
    print(f"figure 6: {work.name} for {count} environments vs 1", flush=True)
    many: list[float] = []
    one: list[float] = []
    stored = manifests = 0
    per_environment = 0  # rounds where the universal resolution did not answer
    for r in range(bench.rounds):
        seconds, core = _install(bench, work, index, f"envs-one-{r}", 1)
        one.append(seconds)
        core.stop()
        remove_tree(core.data_dir.parent)
        seconds, core = _install(bench, work, index, f"envs-many-{r}", count)
        many.append(seconds)
        log = core.data_dir.parent / f"{core.data_dir.name}.log"
        per_environment += "resolving each environment on its own" in log.read_text()
        admin = core.admin()
        release = admin.ListReleases(apb.ListReleasesRequest()).releases[0]
        manifests = sum(m.total_size for m in release.manifests)
        stored = sum(p.stat().st_size for p in (core.data_dir / "blobs").rglob("*.whl"))
        core.stop()
        remove_tree(core.data_dir.parent)
    ratio = median(many) / median(one)
    bench.add(
        Row(
            "6",
            f"install for {count} environments (one universal resolution, shared wheels once)",
            median(many),
            "s",
            "the same for 1 environment",
            median(one),
            "<= 1.5x",
            ratio <= 1.5,
        )
    )
    bench.add(
        Row(
            "6",
            f"bytes stored for the {count} manifests (dedup by sha256)",
            stored / 1e6,
            "MB",
            "sum of the manifests",
            manifests / 1e6,
        )
    )
    bench.notes.append(
        "figure 6 rounds (s): many "
        + ", ".join(f"{v:.2f}" for v in many)
        + "; one "
        + ", ".join(f"{v:.2f}" for v in one)
        + f"; resolved per environment (universal lockfile did not answer) in {per_environment}"
        f" of {bench.rounds} rounds"
    )
