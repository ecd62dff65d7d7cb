"""Counters of `spk-satellite run` in the data dir, for the agent's /metrics.

Runs are short processes of their own, often started by other users than the agent's, so they
cannot count into the agent's memory. Each run adds itself to `run-stats.json` under an exclusive
flock (read, add, write to a temp file, rename): a handful of syscalls per run. Counting is best
effort: a run whose user cannot write the data dir runs all the same, uncounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import FailedPrecondition

log = logging.getLogger(__name__)
STATS_FILE = "run-stats.json"
LOCK_FILE = "run-stats.lock"


@dataclass
class RunStats:
    started: int = 0
    refused: int = 0  # the desired packages were not ready
    exit_codes: dict[int, int] = field(default_factory=dict)


def read_run_stats(data_dir: Path) -> RunStats:
    try:
        raw = json.loads((data_dir / STATS_FILE).read_text())
        return RunStats(
            int(raw.get("started", 0)),
            int(raw.get("refused", 0)),
            {int(k): int(v) for k, v in raw.get("exit_codes", {}).items()},
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return RunStats()


def _update(data_dir: Path, change: Callable[[RunStats], None]) -> None:
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    except OSError as exc:
        log.debug("script run not counted (%s)", exc)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stats = read_run_stats(data_dir)
        change(stats)
        body = {
            "started": stats.started,
            "refused": stats.refused,
            "exit_codes": {str(k): v for k, v in sorted(stats.exit_codes.items())},
        }
        tmp = data_dir / f".{STATS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(body))
        tmp.replace(data_dir / STATS_FILE)
    except OSError as exc:
        log.debug("script run not counted (%s)", exc)
    finally:
        os.close(fd)


def counted_run(data_dir: Path, run: Callable[[], int]) -> int:
    """Run `run` (returns the exit code) and count it: started, then its exit code or refused."""
    if not data_dir.is_dir():
        return run()

    def start(s: RunStats) -> None:
        s.started += 1

    _update(data_dir, start)
    try:
        code = run()
    except FailedPrecondition:

        def refuse(s: RunStats) -> None:
            s.refused += 1

        _update(data_dir, refuse)
        raise

    def finish(s: RunStats) -> None:
        s.exit_codes[code] = s.exit_codes.get(code, 0) + 1

    with contextlib.suppress(Exception):
        _update(data_dir, finish)
    return code
