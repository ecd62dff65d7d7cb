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
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from satellite.store import SatelliteStore
from satellite.store.trees import TreePin
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

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
) -> int:
    """Run `script` with `args`; returns its exit code (128+N when killed by signal N).

    Raises FailedPrecondition when the desired packages are not materialised here.
    """
    resolution = resolve(store)
    if resolution.state == "not_ready":
        raise FailedPrecondition(resolution.message)
    with contextlib.ExitStack() as stack:
        pin = None
        if resolution.state == "ready":
            assert resolution.current_hash is not None
            pin = _pin(stack, store, resolution.current_hash)
        return _run_child(_command(python, pin, Path(script), args), pin, env)


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


def _run_child(cmd: list[str], pin: TreePin | None, env: dict[str, str] | None) -> int:
    # A terminal sends ^C to the whole foreground group, child included, so forwarding SIGINT
    # there would deliver it twice. Without a terminal the child gets its own process group
    # and every signal reaches it exactly once, through us.
    interactive = _stdin_is_tty()
    with _forwarding(skip_sigint=interactive) as started:
        proc = subprocess.Popen(
            cmd,
            env=env,
            pass_fds=(pin.fd,) if pin is not None else (),
            process_group=None if interactive else 0,
        )
        started(proc)
        code = proc.wait()
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def _forwarding(
    skip_sigint: bool,
) -> Iterator[Callable[[subprocess.Popen[bytes]], None]]:
    """Forward SIGTERM/SIGINT/SIGHUP to the child while it runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda _proc: None
        return
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and skip_sigint:
            return  # the terminal already delivered it to the child; keep waiting for it
        if child:
            child[0].send_signal(signum)
        else:
            pending.append(signum)

    def started(proc: subprocess.Popen[bytes]) -> None:
        child.append(proc)
        for signum in pending:
            proc.send_signal(signum)

    # Python-level handlers, not SIG_IGN: exec resets them, so the child starts with defaults.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield started
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):
        return False
