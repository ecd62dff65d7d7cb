"""A sandboxed run from start to outcome: the child bwrap, signals, the timeout, the figures.

bwrap's exit status says little (128+N for a signal, like an `exit(128+N)`), and its reapers
discard resource usage, so the figures come from the bootstrap's reaper inside the sandbox
(satellite.sandbox): the script's exact wait status, peak memory and CPU time. Only when the
timeout kills the sandbox as a whole does the reaper die before it can say; the runner reads
the script's high-water mark and CPU time from /proc just before that kill instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from satellite.sandbox import Sandbox
from satellite.sandbox_policy import SandboxPolicy
from satellite.supervise import ChildSpec, descendant_with_ns_pid, run_child, sample_process


@dataclass(frozen=True)
class Ended:
    """How a run's script ended, whatever ran it."""

    status: int  # os.waitstatus_to_exitcode form: -N when killed by signal N
    peak_memory_bytes: int
    cpu_seconds: float
    duration: float
    timed_out: bool
    limits_reported: tuple[str, ...] = ()


def run_sandboxed(box: Sandbox, policy: SandboxPolicy) -> Ended:
    """Run the prepared sandbox to its end; raises box.failure() when the script never started."""
    sampled: list[tuple[int, float]] = []

    def target(bwrap_pid: int) -> int | None:
        ns_pid = box.started_pid()
        return None if ns_pid is None else descendant_with_ns_pid(bwrap_pid, ns_pid)

    def kill(bwrap_pid: int) -> None:
        script = target(bwrap_pid)
        if script is not None and (sample := sample_process(script)) is not None:
            sampled.append(sample)
        init = box.init_pid()  # its death takes every process of the pid namespace along
        with contextlib.suppress(ProcessLookupError):
            os.kill(init if init is not None else bwrap_pid, signal.SIGKILL)

    # Always its own process group: the script runs in a session of its own (--new-session,
    # so it cannot push input into the caller's terminal) and gets every signal through us.
    spec = ChildSpec(
        box.argv,
        box.env,
        box.pass_fds,
        stderr=box.setup_log_fd,
        timeout=policy.timeout_seconds,
        target=target,
        kill=kill,
    )
    waited = run_child(spec)
    if box.started_pid() is None:
        raise box.failure()
    reported = tuple(box.limits_reported())
    final = box.final_status()
    if final is not None and not waited.timed_out:
        wait_status, peak, cpu = final
        status = os.waitstatus_to_exitcode(wait_status)
        return Ended(status, peak, cpu, waited.duration, False, reported)
    peak, cpu = sampled[0] if sampled else (0, 0.0)
    status = -signal.SIGKILL if waited.timed_out else waited.status
    return Ended(status, peak, cpu, waited.duration, waited.timed_out, reported)
