"""Figure 7: start-up cost of a sandboxed `spk-satellite run` of print("hi") vs an unsandboxed one.

Both are whole `spk-satellite run` processes against the same one-wheel tree, run back to back
in each round (interleaved, so load hits both alike), medians over every run. The info rows time
the bare mechanisms around `python -I -S -c pass` (no runner, no bootstrap), which is how
docs/sandbox.md compares bubblewrap with calling the kernel's namespaces and rlimits directly
(util-linux unshare(1) + prlimit(1), i.e. no bind-mounted view at all).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from satellite.sandbox_view import SETPRIV, SYSTEM_DIRS, interpreter
from satellite.store import SatelliteStore
from satellite.sync import AgentState
from scripts.benchlib.common import PYTHON, Bench, Row, child_env, median, run_timed
from tests.test_runner import build_tree

TARGET_ADDED = 0.050  # seconds the sandbox may add to a run's start-up (issue 16)


def _tree(bench: Bench) -> Path:
    store = SatelliteStore(bench.scratch("sandbox") / "data")
    lockfile_hash = build_tree(store, store.root.parent / "wheels", "1.0")
    store.flip_current(lockfile_hash)
    store.save_state(AgentState(desired_hash=lockfile_hash, status="ready"))
    return store.root


def run(bench: Bench) -> None:
    if not os.access("/usr/bin/bwrap", os.X_OK):
        bench.notes.append("figure 7 skipped: bubblewrap is not installed (.ci/run installs it)")
        return
    data_dir = _tree(bench)
    hi = data_dir.parent / "hi.py"
    hi.write_text('print("hi")\n')
    per_round = 3 if bench.smoke else 10
    base = [PYTHON, "-m", "satellite.cli", "run", "--data-dir", str(data_dir)]
    commands = {"plain": [*base, str(hi)], "sandboxed": [*base, "--sandbox", str(hi)]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    env = child_env()
    for _ in range(bench.rounds * per_round):
        for name, argv in commands.items():
            times[name].append(run_timed(argv, env=env))
    plain, boxed = median(times["plain"]), median(times["sandboxed"])
    who = "root: two bwrap layers" if os.geteuid() == 0 else "one unprivileged bwrap layer"
    bench.add(
        Row(
            "7",
            f'sandboxed print("hi"): spk-satellite run --sandbox ({who})',
            boxed,
            peer="unsandboxed spk-satellite run",
            peer_value=plain,
            target="<= +50 ms",
            met=boxed - plain <= TARGET_ADDED,
            note=f"added {1000 * (boxed - plain):.1f} ms; medians of {len(times['plain'])} runs",
        )
    )
    _mechanisms(bench, per_round)
    bench.notes.append(
        "figure 7 runs (ms): plain "
        + ", ".join(f"{1000 * t:.1f}" for t in times["plain"][:10])
        + "; sandboxed "
        + ", ".join(f"{1000 * t:.1f}" for t in times["sandboxed"][:10])
        + (" (first 10)" if len(times["plain"]) > 10 else "")
    )


def mechanism_commands() -> dict[str, list[str]]:
    """`python -I -S -c pass` bare and under each mechanism (the view: system dirs, /proc,
    /dev and the interpreter's prefix; namespaces as the sandbox uses them)."""
    python, roots = interpreter(sys.executable)
    bare = [python, "-I", "-S", "-c", "pass"]
    view: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            view += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            view += ["--ro-bind", d, d]
    for root in roots:
        parts = root.parts[1:]
        for i in range(1, len(parts)):
            view += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        view += ["--ro-bind", str(root), str(root)]
    view += ["--perms", "0755", "--dir", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    ns = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--die-with-parent"]
    one = ["/usr/bin/bwrap", *ns, "--unshare-user", "--cap-drop", "ALL", *view, "--", *bare]
    commands = {"bare": bare, "bwrap, one layer": one}
    if os.geteuid() == 0:
        inner = ["/usr/bin/bwrap", "--unshare-user", "--disable-userns", "--uid", "0"]
        inner += ["--cap-drop", "ALL", "--bind", "/", "/", "--"]
        drop = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        outer = ["/usr/bin/bwrap", *ns, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID"]
        outer += ["--cap-add", "CAP_SETGID", *view, "--"]
        commands["bwrap, two layers (root -> nobody)"] = [*outer, *drop, *inner, *bare]
    if shutil.which("unshare") and shutil.which("prlimit"):
        direct = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount"]
        direct += ["--ipc", "--uts", "--", "prlimit", "--nproc=256", "--as=4294967296"]
        direct += ["--nofile=1024", "--cpu=3600", "--"]
        commands["unshare(1) + prlimit(1), no view"] = [*direct, *bare]
    return commands


def _mechanisms(bench: Bench, per_round: int) -> None:
    """The bare mechanisms, same interpreter, no runner: what each costs on its own."""
    commands = mechanism_commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(bench.rounds * per_round):
        for name, argv in commands.items():
            times[name].append(run_timed(argv))
    bare = median(times["bare"])
    for name, values in times.items():
        if name == "bare":
            continue
        bench.add(
            Row(
                "7",
                f"mechanism (info): {name}",
                median(values),
                peer="python -I -S -c pass",
                peer_value=bare,
                note=f"added {1000 * (median(values) - bare):.1f} ms",
            )
        )
