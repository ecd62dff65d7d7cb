"""Start a run's child, forward signals to the script, enforce the wall clock, reap with rusage.

One waiting loop for plain and sandboxed runs: a pidfd says when the child is gone (no polling
of waitpid), then wait4 reaps it with the resource usage of the whole run (every descendant
that was waited for, so the sandbox's reapers pass the script's peak memory up).

Signals: a plain run's child is the script, as before. A sandboxed run's child is bwrap, which
forwards nothing and whose pid-namespace init ignores SIGTERM, so SIGTERM/SIGINT/SIGHUP go to
the script itself, found among bwrap's descendants by its pid inside the sandbox. A signal that
arrives before the script has started is delivered as soon as it has.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_KILL_GRACE = 5.0  # seconds for the sandbox to die after its init was killed


@dataclass(frozen=True)
class ChildSpec:
    argv: Sequence[str]
    env: dict[str, str] | None
    pass_fds: tuple[int, ...]
    stderr: int | None = None
    own_group: bool = True  # False for an interactive plain run: the terminal's ^C reaches it
    forward_sigint: bool = True  # False when the terminal already delivered ^C to the script
    timeout: float | None = None
    # The pid to forward a signal to, None while it is not known yet; default: the child.
    target: Callable[[int], int | None] | None = None
    # How to end the run at the timeout; default: SIGKILL to the child's process group.
    kill: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Waited:
    status: int  # os.waitstatus_to_exitcode: negative N for signal N
    usage: resource.struct_rusage
    duration: float
    timed_out: bool


def run_child(spec: ChildSpec) -> Waited:
    started = time.monotonic()
    with _forwarding(spec) as forward:
        proc = subprocess.Popen(
            list(spec.argv),
            env=spec.env,
            pass_fds=spec.pass_fds,
            stderr=spec.stderr,
            process_group=0 if spec.own_group else None,
        )
        forward.attach(proc.pid)
        timed_out = _wait_for_exit(proc.pid, spec, forward, started)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Waited(proc.returncode, usage, time.monotonic() - started, timed_out)


def _wait_for_exit(pid: int, spec: ChildSpec, forward: _Forwarder, started: float) -> bool:
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = started + spec.timeout if spec.timeout else None
        killed_at: float | None = None
        while True:
            wake = killed_at + _KILL_GRACE if killed_at is not None else deadline
            wait = None if wake is None else max(0.0, wake - time.monotonic())
            if forward.pending:  # the script has not started yet: look again soon
                wait = 0.05 if wait is None else min(wait, 0.05)
            if poller.poll(None if wait is None else math.ceil(wait * 1000)):
                return killed_at is not None
            forward.deliver_pending()
            now = time.monotonic()
            if killed_at is None and deadline is not None and now >= deadline:
                (spec.kill or _kill_group)(pid)
                killed_at = now
            elif killed_at is not None and now >= killed_at + _KILL_GRACE:
                _kill_group(pid)  # the sandbox did not die with its init: everything, now
                killed_at = now
    finally:
        os.close(pidfd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class _Forwarder:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.child: int | None = None
        self.pending: list[int] = []

    def attach(self, pid: int) -> None:
        self.child = pid
        self.deliver_pending()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and not self.spec.forward_sigint:
            return  # the terminal already delivered it to the script; keep waiting for it
        self.pending.append(signum)
        self.deliver_pending()

    def deliver_pending(self) -> None:
        if self.child is None or not self.pending:
            return
        target = self.spec.target(self.child) if self.spec.target else self.child
        if target is None:
            return  # the script has not started yet; the waiting loop retries
        for signum in self.pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signum)
        self.pending.clear()


@contextlib.contextmanager
def _forwarding(spec: ChildSpec) -> Iterator[_Forwarder]:
    """Forward SIGTERM/SIGINT/SIGHUP while the child runs (main thread only)."""
    forwarder = _Forwarder(spec)
    if threading.current_thread() is not threading.main_thread():
        yield forwarder
        return
    # Python-level handlers, not SIG_IGN: exec resets them, so the child starts with defaults.
    previous = {sig: signal.signal(sig, forwarder.on_signal) for sig in FORWARDED_SIGNALS}
    try:
        yield forwarder
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def descendant_with_ns_pid(root: int, ns_pid: int) -> int | None:
    """The host pid of the descendant of `root` whose pid in its own namespace is `ns_pid`."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{name}/stat", "rb") as f:
                # comm may contain spaces and parentheses: fields start after the last ')'
                ppid = int(f.read().rpartition(b")")[2].split()[1])
            children.setdefault(ppid, []).append(int(name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    levels = line.split()[1:]
                    if len(levels) > 1 and int(levels[-1]) == ns_pid:
                        return pid
                    break
        todo += children.get(pid, [])
    return None


def sample_process(pid: int) -> tuple[int, float] | None:
    """(peak resident bytes, CPU seconds) of a live process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((line.split()[1] for line in f if line.startswith("VmHWM:")), "0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # after the ')' of comm: state is field 0, utime 11 and stime 12 (stat(5) fields 14, 15)
    return int(hwm) * 1024, (int(fields[11]) + int(fields[12])) / ticks
