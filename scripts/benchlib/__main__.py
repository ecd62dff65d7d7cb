"""Command line of scripts/bench: `python -m scripts.benchlib [--smoke] [--rounds N] ...`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from scripts.benchlib import (
    deltas,
    environments,
    fanout,
    install,
    materialise,
    report,
    sandbox,
    scale,
    transfer,
    wsci,
)
from scripts.benchlib.common import REPO, Bench, format_row, remove_tree
from scripts.benchlib.workload import prepare
from tests.index_server import PackageIndex

FIGURES = (
    "materialise",
    "install",
    "environments",
    "transfer",
    "delta",
    "fanout",
    "sandbox",
    "scale",
    "deltas",
    "wsci",
)
ANALYSIS = REPO / "docs" / "benchmarks-analysis.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--rounds", type=int, default=5, help="rounds per figure (median is quoted)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny synthetic wheels, 1 round, no peers"
        " that need installing (uv, nginx) or PyPI: checks that the bench still runs",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        default=[],
        help="run only these figures (repeatable)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spk-bench")
    p.add_argument("--work-dir", type=Path, help="scratch dir (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument(
        "--agents-dir",
        type=Path,
        help="fan-out agents' data dirs (e.g. on tmpfs,"
        " to tell the shared disk's fsync queue from the core)",
    )
    args = p.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx's workers run as another user and must reach work/index
    bench = Bench(
        rounds=1 if args.smoke else args.rounds,
        smoke=args.smoke,
        work=work,
        cache=args.cache,
        only=set(args.only),
        agents_dir=args.agents_dir,
    )
    bench.note_load("start")
    try:
        if bench.wants("sandbox"):  # needs no workload: first, while the machine is quiet
            sandbox.run(bench)
            bench.note_load("after figure 6")
        if bench.only == {"sandbox"}:
            return _finish(args, bench, "figure 6 only (no workload)", work)
        workload = prepare(bench)
        described = f"{workload.name}, {len(workload.wheels)} wheels, {workload.size / 1e6:.1f} MB"
        if bench.wants("materialise"):
            materialise.run(bench, workload)
            bench.note_load("after figure 1")
        if bench.wants("wsci"):  # its own workload and index
            wsci.run(bench)
            bench.note_load("after figure 10")
        wants_core = any(
            bench.wants(f)
            for f in ("install", "environments", "transfer", "delta", "fanout", "scale", "deltas")
        )
        if wants_core:
            with PackageIndex(workload.index_dir) as index:
                if bench.wants("environments"):
                    environments.run(bench, workload, index)
                    bench.note_load("after figure 6")
                if any(bench.wants(f) for f in ("install", "transfer", "delta")):
                    core = install.run(bench, workload, index)
                    try:
                        if bench.wants("transfer"):
                            transfer.run_transfer(bench, workload, core)
                            transfer.run_agent_rss(bench, workload, core)
                        if bench.wants("delta"):
                            transfer.run_delta(bench, workload, core)
                    finally:
                        core.stop()
                    bench.note_load("after figures 5, 2, 3")
                if bench.wants("fanout"):
                    fanout.run(bench, workload, index)
                    bench.note_load("after figure 4")
                if bench.wants("scale"):
                    scale.run(bench, workload, index)
                    bench.note_load("after figure 8")
                if bench.wants("deltas"):
                    deltas.run(bench, workload, index)
                    bench.note_load("after figure 9")
    finally:
        if not args.keep:
            remove_tree(work)
    return _finish(args, bench, described, work)


def _finish(args: argparse.Namespace, bench: Bench, described: str, work: Path) -> int:
    if not args.keep:
        remove_tree(work)
    print("\nsummary:")
    for row in bench.rows:
        print(f"  {format_row(row)}")
    analysis = "" if bench.smoke or not ANALYSIS.exists() else ANALYSIS.read_text()
    text = report.render(bench, described, analysis)
    report.write(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
