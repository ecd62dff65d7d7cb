"""Figure 5: a core install of the set from a local pypiserver vs `pip download` of the same set
from the same index, and vs `uv pip compile` plus downloading the wheels it names (curl, 8 in
parallel). Each round uses a cold core data dir (nothing to skip) and a cold uv cache. Then, for
information, installs that change one pin on a core that holds the rest, next to `pip download`
of the whole new set."""

from __future__ import annotations

import os
import subprocess

from scripts.benchlib.common import Bench, Row, child_env, median, pip_download, remove_tree
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import Workload, pin_of
from tests.index_server import PackageIndex


def run(bench: Bench, work: Workload, index: PackageIndex) -> BenchCore:
    """Runs the rounds; returns the last round's core (the set installed), still running."""
    print(f"figure 5: core install of {work.name} vs pip download", flush=True)
    ours: list[float] = []
    peers: list[float] = []
    uvs: list[float] = []
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
        peers.append(pip_download(bench.scratch(f"pipdl-{r}"), index.url, pins))
        uvs.append(_uv_compile_and_download(bench, index, pins, f"uvdl-{r}"))
    assert core is not None
    _one_pin_changed(bench, work, index, core)
    ratio = median(ours) / median(peers)
    bench.add(
        Row(
            "5",
            "core install (resolve, download, verify, publish)",
            median(ours),
            "s",
            "pip download",
            median(peers),
            "<= 1.0x",
            ratio <= 1.0,
        )
    )
    bench.add(
        Row(
            "5",
            "core install, next to its own resolver and downloads",
            median(ours),
            "s",
            "uv pip compile + curl of the wheels",
            median(uvs),
        )
    )
    bench.notes.append(
        "figure 5 rounds (s): core "
        + ", ".join(f"{v:.2f}" for v in ours)
        + "; pip download "
        + ", ".join(f"{v:.2f}" for v in peers)
        + "; uv pip compile + curl "
        + ", ".join(f"{v:.2f}" for v in uvs)
    )
    return core


def _uv_compile_and_download(
    bench: Bench, index: PackageIndex, pins: list[str], name: str
) -> float:
    """The core's own resolver run by hand, then the wheels it names fetched by curl."""
    import time
    import tomllib

    from core.install.uv_resolver import uv_binary

    dest = bench.scratch(name)
    reqs, lock = dest / "requirements.txt", dest / "pylock.toml"
    reqs.write_text("".join(f"{p}\n" for p in pins))
    os.sync()
    started = time.perf_counter()
    argv = [uv_binary(), "pip", "compile", "-q", "--no-config", "--only-binary", ":all:"]
    argv += ["--default-index", index.url, "--cache-dir", str(dest / "cache")]
    subprocess.run([*argv, str(reqs), "-o", str(lock)], check=True, env=child_env())
    urls = [p["wheels"][0]["url"] for p in tomllib.loads(lock.read_text())["packages"]]
    curl = ["curl", "-sSf", "--parallel", "--parallel-max", "8"]
    for i, url in enumerate(urls):
        curl += ["-o", str(dest / f"{i}.whl"), url]
    subprocess.run(curl, check=True)
    elapsed = time.perf_counter() - started
    remove_tree(dest)
    return elapsed


def _one_pin_changed(bench: Bench, work: Workload, index: PackageIndex, core: BenchCore) -> None:
    """Info: w31 plus a ~1 MiB package whose version flips each round, on a warm core."""
    ours: list[float] = []
    peers: list[float] = []
    for r in range(bench.rounds):
        changed = pin_of(work.delta_v2 if r % 2 else work.delta_v1)
        core.set_packages([*work.pins, changed])
        os.sync()
        ours.append(core.install()[1])
        pins = [f"{n}=={v}" for n, v in [*work.pins, changed]]
        peers.append(pip_download(bench.scratch(f"pipdl-change-{r}"), index.url, pins))
    bench.add(
        Row(
            "5",
            "install after one pin changed (the store holds the rest)",
            median(ours),
            "s",
            "pip download (whole set)",
            median(peers),
        )
    )
    bench.notes.append(
        "figure 5 one-pin-change rounds (s): core "
        + ", ".join(f"{v:.2f}" for v in ours)
        + "; pip download "
        + ", ".join(f"{v:.2f}" for v in peers)
    )
