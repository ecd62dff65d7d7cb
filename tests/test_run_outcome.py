"""satellite.run_outcome: which limit stopped a run, and the run log the agent follows."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from satellite import run_outcome
from satellite.run_outcome import RunLog, RunOutcome, classify, follow_run_log


def outcome(**changes: object) -> RunOutcome:
    base: dict[str, object] = {
        "script": "/srv/job.py",
        "lockfile_hash": "a" * 64,
        "sandbox": "preset default",
        "started_at_unix": 1.0,
        "duration_seconds": 0.5,
        "exit_code": 0,
        "signal": None,
        "peak_memory_bytes": 10 << 20,
        "cpu_seconds": 0.1,
        "stopped_by": None,
    }
    base.update(changes)
    return RunOutcome(**base)  # type: ignore[arg-type]


def test_which_limit_stopped_the_run() -> None:
    assert classify(None, 0.1, 10, False, []) == (None, ())
    assert classify(signal.SIGXCPU, 10.0, 10, False, []) == ("cpu", ("cpu",))
    # The hard CPU limit (a second after the soft one) kills a script that ignored SIGXCPU.
    assert classify(signal.SIGKILL, 11.0, 10, False, []) == ("cpu", ("cpu",))
    assert classify(signal.SIGKILL, 1.0, 10, False, []) == (None, ())  # someone else's kill
    assert classify(None, 0.1, None, False, ["memory"]) == ("memory", ("memory",))
    assert classify(None, 0.1, None, False, ["processes", "processes"]) == (
        "processes",
        ("processes",),
    )
    assert classify(signal.SIGKILL, 0.1, None, True, ["processes"]) == (
        "timeout",
        ("timeout", "processes"),
    )
    # A script that survived its fork errors and then exited on its own was not stopped.
    assert classify(signal.SIGTERM, 0.1, None, False, ["processes"]) == (None, ("processes",))


def test_describe_names_how_it_ended() -> None:
    text = outcome(
        exit_code=137, signal=9, stopped_by="timeout", limits_hit=("timeout", "processes")
    ).describe()
    assert text == (
        "/srv/job.py: signal 9 after 0.50 s, peak memory 10.0 MiB, cpu 0.10 s, stopped by the"
        " timeout limit (also hit: processes) [sandbox preset default]"
    )
    assert (
        outcome(sandbox="")
        .describe()
        .endswith("exit 0 after 0.50 s, peak memory 10.0 MiB, cpu 0.10 s [unsandboxed]")
    )


def test_the_run_log_keeps_the_newest_and_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RunLog(tmp_path)
    assert log.last(5) == []
    monkeypatch.setattr(run_outcome, "_ROTATE_BYTES", 600)
    for code in range(6):
        assert log.append(outcome(exit_code=code))
    assert (tmp_path / "runs.jsonl.1").exists()  # rotated once it passed the cap
    codes = [record["exit_code"] for record in log.last(2)]
    assert codes == [4, 5]
    assert RunLog(tmp_path / "missing").append(outcome()) is False  # not writable: reported


async def test_the_agent_follows_new_runs_into_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    RunLog(tmp_path).append(outcome(exit_code=3))  # from before the agent started: not logged
    logger = logging.getLogger("test.runs")
    task = asyncio.create_task(follow_run_log(tmp_path, logger, interval=0.02))
    try:
        with caplog.at_level(logging.INFO, logger="test.runs"):
            await asyncio.sleep(0.1)
            RunLog(tmp_path).append(outcome(exit_code=7, stopped_by="memory"))
            for _ in range(100):
                if "exit 7" in caplog.text:
                    break
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert "script run: /srv/job.py: exit 7 after 0.50 s" in caplog.text
    assert "stopped by the memory limit" in caplog.text
    assert "exit 3" not in caplog.text


async def test_each_record_followed_is_handed_to_the_callback_as_parsed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[dict[str, object]] = []
    calls = 0

    def count(record: dict[str, object]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("exporter down")  # logged; the next records still arrive
        seen.append(record)

    logger = logging.getLogger("test.runs.counted")
    task = asyncio.create_task(follow_run_log(tmp_path, logger, interval=0.02, on_record=count))
    try:
        with caplog.at_level(logging.INFO, logger="test.runs.counted"):
            await asyncio.sleep(0.1)
            log = RunLog(tmp_path)
            log.append(outcome(exit_code=1))
            with log.path.open("a") as f:  # anyone who can write the data dir may append
                f.write('torn {"script\n42\n["a list"]\n')
            log.append(outcome(exit_code=137, signal=9, stopped_by="timeout", sandbox=""))
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert calls == 2  # the two records; the torn line and the non-objects are skipped
    assert "counting a script run failed" in caplog.text
    (record,) = seen
    assert record["stopped_by"] == "timeout" and record["sandbox"] == ""
    assert record["duration_seconds"] == 0.5 and record["peak_memory_bytes"] == 10 << 20
    assert "exit 1 after" in caplog.text and "signal 9 after" in caplog.text
