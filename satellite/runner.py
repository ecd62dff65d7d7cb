"""`spk-satellite run`: run a user script against exactly the current tree, nothing else.

The script runs in `python -I -S`: isolated mode ignores PYTHON* variables, the user site and
the script's directory; -S skips `site`, so neither the agent's venv nor the system
site-packages (pip included) is on the path. A small bootstrap then appends the pinned tree's
site-packages, restores the `exit`/`quit`/`help` builtins that -S leaves out (scripts call
`exit()`), and runs the script with runpy under its own argv.

`current` is resolved once; that tree is pinned (a shared flock, whose descriptor the child
inherits so the pin lives exactly as long as the run) and a flip during the run changes nothing
for it. Bytecode goes to `trees/<hash>/pycache/` via -X pycache_prefix: imports stay fast after
the first run, the tree itself stays byte-for-byte what drift checks expect, and the cache is
deleted with its tree.

With `--sandbox`, or whenever the data dir has a host policy (satellite/host_policy.py), the same
interpreter and tree run inside bubblewrap instead (satellite/sandbox.py, docs/sandbox.md): the
pin is then held here (the sandbox cannot outlive this process), and a sandbox that cannot be set
up refuses the run. Every run's outcome goes to the data dir's run log (satellite/run_outcome.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from satellite.host_policy import run_policy
from satellite.run_outcome import RunLog, RunOutcome, classify, peak_rss_bytes
from satellite.sandbox import Sandbox, SandboxRequest
from satellite.sandbox_run import Ended, run_sandboxed
from satellite.store import SatelliteStore
from satellite.store.trees import TreePin
from satellite.supervise import ChildSpec, run_child
from shared.errors import FailedPrecondition, NotFound

# argv after -c: [tree site-packages or "", script, *script args]
BOOTSTRAP = """\
import runpy, site, sys
site.setquit(); site.setcopyright(); site.sethelper()
tree, script = sys.argv[1], sys.argv[2]
if tree:
    sys.path.append(tree)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""

_PIN_ATTEMPTS = 3


@dataclass(frozen=True)
class Resolution:
    """What a run would use now: state "none" (nothing desired), "ready" or "not_ready"."""

    state: str
    desired_hash: str | None
    current_hash: str | None
    message: str = ""


def resolve(store: SatelliteStore) -> Resolution:
    desired = store.load_state().desired_hash
    current = store.current_hash()
    if desired == "":
        return Resolution("none", desired, current)
    # No state yet (agent never synced since the data dir was made): trust `current`.
    expected = desired if desired is not None else current
    if expected is not None and current == expected:
        return Resolution("ready", desired, current)
    message = (
        f"packages not ready on this satellite: expected {expected or '(nothing synced yet)'},"
        f" have {current or 'none'}; the agent is still syncing or failed (see"
        " `spk-satellite status`)"
    )
    return Resolution("not_ready", desired, current, message)


def run_script(
    store: SatelliteStore,
    script: Path | str,
    args: Sequence[str] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    sandbox: str | None = None,
) -> int:
    """Run `script` with `args`; returns its exit code (128+N when killed by signal N).

    `sandbox`: None (no --sandbox), "" (--sandbox) or a preset name or policy file; a host
    policy (satellite/host_policy.py) sandboxes the run whatever this says. Raises
    FailedPrecondition when the desired packages are not materialised here, SandboxUnavailable
    (the script never started) when the sandbox the run needs cannot be set up.
    """
    return run_and_report(store, script, args, python, env, sandbox).exit_code


def run_and_report(
    store: SatelliteStore,
    script: Path | str,
    args: Sequence[str] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    sandbox: str | None = None,
) -> RunOutcome:
    """run_script, returning the whole outcome (also recorded in the data dir's run log)."""
    chosen = run_policy(store.root, sandbox)  # before anything else: an unusable policy refuses
    resolution = resolve(store)
    if resolution.state == "not_ready":
        raise FailedPrecondition(resolution.message)
    started_at = time.time()
    with contextlib.ExitStack() as stack:
        pin = None
        if resolution.state == "ready":
            assert resolution.current_hash is not None
            pin = _pin(stack, store, resolution.current_hash)
        if chosen.policy is None:
            ended = _run_plain(_command(python, pin, Path(script), args), pin, env)
            source, cpu_limit = "", None
        else:
            caller_env = env if env is not None else dict(os.environ)
            request = SandboxRequest(
                chosen.policy,
                chosen.settings,
                store.root,
                pin,
                Path(script),
                args,
                python,
                caller_env,
            )
            ended = run_sandboxed(stack.enter_context(Sandbox(request)), chosen.policy)
            source, cpu_limit = chosen.policy.source, chosen.policy.limits.cpu_seconds
        outcome = _outcome(script, pin, source, started_at, ended, cpu_limit)
    RunLog(store.root).append(outcome)
    if outcome.stopped_by:
        print(f"spk-satellite: {outcome.describe()}", file=sys.stderr)
    return outcome


def _run_plain(cmd: list[str], pin: TreePin | None, env: dict[str, str] | None) -> Ended:
    # A terminal sends ^C to the whole foreground group, child included, so forwarding SIGINT
    # there would deliver it twice. Without a terminal the child gets its own process group
    # and every signal reaches it exactly once, through us.
    interactive = _stdin_is_tty()
    fds = (pin.fd,) if pin is not None else ()
    spec = ChildSpec(cmd, env, fds, own_group=not interactive, forward_sigint=not interactive)
    waited = run_child(spec)
    # ru_maxrss of a direct child starts at our own high-water mark (inherited at fork), so for
    # a script smaller than this process the figure is an upper bound (docs/sandbox.md).
    cpu = waited.usage.ru_utime + waited.usage.ru_stime
    return Ended(waited.status, peak_rss_bytes(waited.usage), cpu, waited.duration, False)


def _outcome(
    script: Path | str,
    pin: TreePin | None,
    sandbox: str,
    started_at: float,
    ended: Ended,
    cpu_limit: int | None,
) -> RunOutcome:
    signum = -ended.status if ended.status < 0 else None
    code = 128 + signum if signum is not None else ended.status
    stopped_by, hits = classify(
        signum, ended.cpu_seconds, cpu_limit, ended.timed_out, ended.limits_reported
    )
    return RunOutcome(
        script=str(script),
        lockfile_hash=pin.lockfile_hash if pin is not None else None,
        sandbox=sandbox,
        started_at_unix=round(started_at, 3),
        duration_seconds=round(ended.duration, 4),
        exit_code=code,
        signal=signum,
        peak_memory_bytes=ended.peak_memory_bytes,
        cpu_seconds=round(ended.cpu_seconds, 3),
        stopped_by=stopped_by,
        limits_hit=hits,
    )


def status(store: SatelliteStore) -> dict[str, object]:
    """Desired and current hash, resolution state, last sync status and error, tree size."""
    state = store.load_state()
    resolution = resolve(store)
    size = 0
    if resolution.current_hash is not None:
        with contextlib.suppress(NotFound):
            size = store.tree_size_bytes(resolution.current_hash)
    return {
        "desired_hash": state.desired_hash,
        "current_hash": resolution.current_hash,
        "state": resolution.state,
        "sync_status": state.status,
        "last_error": state.error,
        "tree_size_bytes": size,
        "highest_sequence": state.highest_sequence,
        "updated_at_unix": state.updated_at_unix,
    }


def _pin(stack: contextlib.ExitStack, store: SatelliteStore, lockfile_hash: str) -> TreePin:
    # The tree can vanish between resolving and pinning only through GC after a flip or a
    # drift-repair swap; both leave `current` (re)pointing at a complete tree, so retry that.
    for _ in range(_PIN_ATTEMPTS):
        try:
            return stack.enter_context(store.pin_tree(lockfile_hash))
        except NotFound:
            if store.current_hash() != lockfile_hash:
                break
    raise FailedPrecondition(
        f"packages not ready on this satellite: tree {lockfile_hash} disappeared while starting"
        " the run; try again"
    )


def _command(python: str, pin: TreePin | None, script: Path, args: Sequence[str]) -> list[str]:
    # Absolute paths: a script that changes directory must keep importing from its tree.
    cmd = [python, "-I", "-S"]
    if pin is not None:
        cmd += ["-X", f"pycache_prefix={pin.pycache.absolute()}"]
    site_dir = str(pin.site.absolute()) if pin is not None else ""
    return [*cmd, "-c", BOOTSTRAP, site_dir, str(script.absolute()), *args]


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):
        return False
