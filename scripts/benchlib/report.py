"""The table: printed at the end and written to docs/benchmarks.md (or --out)."""

from __future__ import annotations

import datetime
from pathlib import Path

from scripts.benchlib.common import Bench, fmt, machine, verdict

HEADER = "| # | figure | ours | peer | peer value | ratio | target | verdict | note |"


def render(bench: Bench, workload: str, analysis: str) -> str:
    facts = machine()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (see `scripts/benchlib/__init__.py`); re-run it to refresh."
        " Every figure is measured next to its peer in the same run: quote the ratios, not the"
        " absolute numbers, which drift between machines and with load.",
        "",
        f"- date: {now}"
        + (" (SMOKE run: tiny synthetic wheels, not a measurement)" if bench.smoke else ""),
        f"- machine: {facts['nproc']} cores ({facts['cpu']}), {facts['ram']} RAM,"
        f" kernel {facts['kernel']}, Python {facts['python']}",
        f"- workload: {workload}; {bench.rounds} round(s) per figure, medians",
        "- load average (1/5/15 min) during the run: "
        + "; ".join(f"{when}: {load}" for when, load in bench.load),
        "",
        HEADER,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in bench.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        peer_value = fmt(row.peer_value, row.unit) if row.peer else ""
        lines.append(
            f"| {row.figure} | {row.what} | {fmt(row.ours, row.unit)} | {row.peer} | {peer_value}"
            f" | {ratio} | {row.target} | {verdict(row.met) if row.target else ''} | {row.note} |"
        )
    lines += ["", "## Raw rounds", ""]
    lines += [f"- {note}" for note in bench.notes]
    if analysis:
        lines += ["", analysis.rstrip()]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
