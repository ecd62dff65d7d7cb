"""What each `spk-satellite run` reports: exit code or signal, duration, peak memory, the limit
that stopped it, and where that goes.

    <data-dir>/runs.jsonl       one JSON object per finished run, appended by the run itself;
    <data-dir>/runs.jsonl.1     the previous ~1 MiB of them (rotated by the writer)

`spk-satellite status` shows the last ones, and the agent follows the file into its log
(`follow_run_log`), so both see runs started by anyone who can write the data dir. A caller who
cannot write it (an ordinary user on a host whose data dir belongs to the agent) still gets the
exit code; the record is then skipped with one warning. With --metrics-listen the agent also
hands each record to its metrics (satellite/metrics.py `AgentMetrics.script_run`): runs by
`sandbox` (set or ""), `spk_satellite_script_runs_stopped_total{limit}` by `stopped_by`, and
histograms of `duration_seconds` and `peak_memory_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RUN_LOG = "runs.jsonl"
_ROTATE_BYTES = 1 << 20
STOPPERS = ("timeout", "cpu", "memory", "processes")


@dataclass(frozen=True)
class RunOutcome:
    script: str
    lockfile_hash: str | None
    sandbox: str  # the policy's source, "" when unsandboxed
    started_at_unix: float
    duration_seconds: float
    exit_code: int  # what `run` returns: the script's status, 128+N when killed by signal N
    signal: int | None
    peak_memory_bytes: int  # the largest resident set of any process of the run
    cpu_seconds: float
    stopped_by: str | None  # one of STOPPERS: the limit that ended the run
    limits_hit: tuple[str, ...] = ()  # every limit reached, also those the script survived

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["limits_hit"] = list(self.limits_hit)
        return out

    def describe(self) -> str:
        how = f"signal {self.signal}" if self.signal else f"exit {self.exit_code}"
        text = (
            f"{self.script}: {how} after {self.duration_seconds:.2f} s, peak memory"
            f" {self.peak_memory_bytes / (1 << 20):.1f} MiB, cpu {self.cpu_seconds:.2f} s"
        )
        if self.stopped_by:
            text += f", stopped by the {self.stopped_by} limit"
        extra = [hit for hit in self.limits_hit if hit != self.stopped_by]
        if extra:
            text += f" (also hit: {', '.join(extra)})"
        return text + (f" [sandbox {self.sandbox}]" if self.sandbox else " [unsandboxed]")


def classify(
    signum: int | None,
    cpu_seconds: float,
    cpu_limit: int | None,
    timed_out: bool,
    reported: Iterable[str],
) -> tuple[str | None, tuple[str, ...]]:
    """(stopped_by, limits_hit) from how the run ended and what the bootstrap reported."""
    hits = [hit for hit in STOPPERS if hit in set(reported)]
    cpu_kill = signum == signal.SIGKILL and cpu_limit is not None and cpu_seconds >= cpu_limit
    if signum == signal.SIGXCPU or cpu_kill:
        hits.append("cpu")
    if timed_out:
        return "timeout", tuple(dict.fromkeys(["timeout", *hits]))
    hits = list(dict.fromkeys(hits))
    for stopper in ("cpu", "memory", "processes"):
        if stopper in hits and (stopper != "processes" or signum is None):
            return stopper, tuple(hits)
    return None, tuple(hits)


def peak_rss_bytes(usage: resource.struct_rusage) -> int:
    return int(usage.ru_maxrss) * 1024  # KiB on Linux


# --- the run log ------------------------------------------------------------------------------


class RunLog:
    """`<data-dir>/runs.jsonl`: appended by runs, read by status, followed by the agent."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / RUN_LOG

    def append(self, outcome: RunOutcome) -> bool:
        """Record `outcome`; False (with a warning) when the data dir is not writable to us."""
        line = (json.dumps(outcome.as_dict(), sort_keys=True) + "\n").encode()
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_size > _ROTATE_BYTES:
                    os.replace(self.path, self.path.with_name(RUN_LOG + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("run outcome not recorded in %s: %s", self.path, exc.strerror)
            return False
        try:
            os.write(fd, line)  # one write of a short line: concurrent runs do not interleave
        finally:
            os.close(fd)
        return True

    def last(self, count: int) -> list[dict[str, Any]]:
        """The newest `count` records, oldest first."""
        try:
            with self.path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines[-count:]:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


async def follow_run_log(
    data_dir: Path,
    logger: logging.Logger,
    interval: float = 1.0,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Log every run recorded from now on (the agent runs this beside itself until cancelled);
    `on_record` is called with each record, as parsed (the agent's metrics count them)."""
    import asyncio  # here: `spk-satellite run` imports this module and needs no event loop

    run_log = RunLog(data_dir)
    inode, offset = _position(run_log.path)
    while True:
        await asyncio.sleep(interval)
        now_inode, size = _position(run_log.path)
        if now_inode != inode or size < offset:  # rotated or recreated
            inode, offset = now_inode, 0
        if size <= offset:
            continue
        with contextlib.suppress(OSError), run_log.path.open("rb") as f:
            f.seek(offset)
            chunk = f.read(size - offset)
            cut = chunk.rfind(b"\n") + 1  # a line still being written waits for the next pass
            offset += cut
            for line in chunk[:cut].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):  # not ours: anyone who can write may append
                    continue
                with contextlib.suppress(ValueError, TypeError):
                    logger.info("script run: %s", describe_record(record))
                if on_record is not None:
                    try:
                        on_record(record)
                    except Exception:  # a metric is not worth losing the log of runs for
                        logger.exception("counting a script run failed")


def describe_record(record: dict[str, Any]) -> str:
    fields = {f.name for f in dataclasses.fields(RunOutcome)}
    values = {k: v for k, v in record.items() if k in fields}
    values["limits_hit"] = tuple(values.get("limits_hit", ()))
    return RunOutcome(**values).describe()


def _position(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, 0
    return st.st_ino, st.st_size
