"""Figure 5: a core install of the set from a local pypiserver vs `pip download` of the same set
from the same index. Each round uses a cold core data dir (nothing to skip)."""

from __future__ import annotations

import os

from scripts.benchlib.common import PYTHON, Bench, Row, child_env, median, remove_tree, run_timed
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import Workload
from tests.index_server import PackageIndex


def run(bench: Bench, work: Workload, index: PackageIndex) -> BenchCore:
    """Runs the rounds; returns the last round's core (the set installed), still running."""
    print(f"figure 5: core install of {work.name} vs pip download", flush=True)
    ours: list[float] = []
    peers: list[float] = []
    pins = [f"{n}=={v}" for n, v in work.pins]
    core: BenchCore | None = None
    for r in range(bench.rounds):
        if core is not None:
            core.stop()
            remove_tree(core.data_dir.parent)
        core = BenchCore(bench.scratch(f"core-{r}") / "core").start()
        core.configure(index.url)
        core.set_packages(work.pins)
        os.sync()
        ours.append(core.install()[1])
        dest = bench.scratch(f"pipdl-{r}")
        os.sync()
        argv = [PYTHON, "-m", "pip", "download", "--isolated", "--disable-pip-version-check"]
        argv += ["-q", "--no-cache-dir", "--only-binary=:all:", "--index-url", index.url]
        peers.append(run_timed([*argv, "-d", str(dest), *pins], env=child_env()))
        remove_tree(dest)
    assert core is not None
    ratio = median(ours) / median(peers)
    bench.add(
        Row(
            "5",
            "core install (resolve, download, verify, publish)",
            median(ours),
            "s",
            "pip download",
            median(peers),
            "<= 1.2x",
            ratio <= 1.2,
        )
    )
    bench.notes.append(
        "figure 5 rounds (s): core "
        + ", ".join(f"{v:.2f}" for v in ours)
        + "; pip download "
        + ", ".join(f"{v:.2f}" for v in peers)
    )
    return core
