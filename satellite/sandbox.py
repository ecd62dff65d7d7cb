"""One sandboxed run's resources: preflight checks, scratch dir, descriptors and the command.

    with Sandbox(request) as box:      # refuses (SandboxUnavailable) what this host cannot do
        Popen(box.argv, env=box.env, pass_fds=box.pass_fds, stderr=box.setup_log_fd)
        ...
        box.events()                   # what the bootstrap reported: started, limits hit

Fail closed: the script runs only after SANDBOX_BOOTSTRAP, inside the sandbox, has set every
limit and said "started" on the report descriptor. bwrap's own stderr goes to a private log (the
bootstrap hands the script the caller's real stderr), so when "started" never comes the log says
why, and `failure()` turns it into an error naming the cause and the fix.

Limits are set by the bootstrap rather than by prlimit(1) or preexec_fn outside: RLIMIT_NPROC
counts processes per user *namespace* only when it is set inside the run's user namespace (set
before bwrap creates it, the namespace inherits it as its ceiling, counted against every process
of that uid on the host), and it costs no extra exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from satellite.host_policy import HostSettings, unprivileged_ids
from satellite.sandbox_policy import Limits, SandboxPolicy
from satellite.sandbox_seccomp import no_network_filter
from satellite.sandbox_view import NO_NET_HOSTS, SETPRIV, ViewSpec, bwrap_argv, interpreter
from satellite.store.trees import TreePin
from shared.errors import InvalidArgument, SandboxUnavailable

# argv after -c: [report fd, stderr fd, limits, tree site-packages or "", script, *script args]
# with limits as "RLIMIT_X=soft:hard,...". Plain text, not json: importing json costs ~4 ms of
# a run that takes ~10 ms unsandboxed. The first process stays behind as the script's reaper:
# bwrap's own reapers discard their children's resource usage, so this is the one place where
# the script's exit status, peak memory and CPU time can be read exactly (wait4), also when a
# limit killed it.
SANDBOX_BOOTSTRAP = """\
import os, resource, sys
out, err, limits, tree = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def report(*words):
    try:
        os.write(out, (" ".join(map(str, words)) + "\\n").encode())
    except OSError:
        pass
for item in filter(None, limits.split(",")):
    name, _, values = item.partition("=")
    soft, hard = map(int, values.split(":"))
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError) as exc:
        report("refused", name, hard, resource.getrlimit(getattr(resource, name))[1], exc)
        os._exit(125)
os.dup2(err, 2)
os.close(err)
script = os.fork()
if script:
    _, status, usage = os.wait4(script, 0)
    report("status", status, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)
import runpy, site
report("started", os.getpid())
_fork, hit = os.fork, set()
def limit(name):  # once per process: a fork loop that survives its errors must not flood
    if name not in hit:
        hit.add(name)
        report("limit", name)
def fork():
    try:
        return _fork()
    except BlockingIOError:
        limit("processes")
        raise
os.fork = fork
site.setquit(); site.setcopyright(); site.sethelper()
if tree:
    sys.path.append(tree)
sys.argv = sys.argv[5:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except MemoryError:
    limit("memory")
    raise
except BlockingIOError as exc:
    frames = __import__("traceback").walk_tb(exc.__traceback__)
    if any(f.f_code.co_name == "_execute_child" for f, _ in frames):
        limit("processes")
    raise
"""

STUB_RESOLV = b"# no network in this sandbox\n"
SCRATCH_PREFIX = "spk-run-"  # then the runner's pid: a dead runner's dir is found and removed
_REPORT_CAP = 1 << 20
_USERNS_HINTS = ("namespace", "uid map", "setting up uid", "No space left", "Operation not perm")


@dataclass(frozen=True)
class SandboxRequest:
    policy: SandboxPolicy
    settings: HostSettings
    data_dir: Path
    pin: TreePin | None
    script: Path
    args: Sequence[str]
    python: str
    caller_env: Mapping[str, str]


def rlimits(limits: Limits) -> list[tuple[str, int, int]]:
    """(name, soft, hard) for the bootstrap; the CPU hard limit is a second later, so SIGXCPU
    (which names the limit) comes first and SIGKILL only for a script that ignores it."""
    out: list[tuple[str, int, int]] = []
    if limits.cpu_seconds:
        out.append(("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1))
    for name, value in (
        ("RLIMIT_AS", limits.memory_bytes),
        ("RLIMIT_NOFILE", limits.open_files),
        ("RLIMIT_NPROC", limits.processes),
    ):
        if value:
            out.append((name, value, value))
    return out


def script_env(policy: SandboxPolicy, caller_env: Mapping[str, str]) -> dict[str, str]:
    """A clean allowlist: never the caller's (or the agent's) environment wholesale."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"}
    for name in policy.pass_env:
        if name in caller_env and not name.startswith("SPK_"):
            env[name] = caller_env[name]
    env.update(policy.env)
    return env


class Sandbox:
    """Context manager owning a run's scratch dir and descriptors; see the module docstring."""

    def __init__(self, request: SandboxRequest) -> None:
        self.request = request
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.pass_fds: tuple[int, ...] = ()
        self.scratch: Path | None = None
        self.setup_log_fd = -1
        self._fds: list[int] = []
        self._report_fd = -1
        self._info_fd = -1

    def __enter__(self) -> Sandbox:
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.scratch is not None:
            _remove_scratch(self.scratch)
            self.scratch = None

    def _prepare(self) -> None:
        req = self.request
        policy, settings = req.policy, req.settings
        drop_to = self._preflight()
        script_fd = self._open_script()
        _remove_stale_scratch(drop_to[0] if drop_to else os.geteuid())
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        if drop_to is not None:
            os.chown(self.scratch, *drop_to)
        self._report_fd = self._tmpfile()
        self._info_fd = self._tmpfile()
        self.setup_log_fd = self._tmpfile()
        stderr_fd = os.dup(2)
        self._fds.append(stderr_fd)
        offline = policy.network != "host"
        seccomp_fd = self._data_fd(no_network_filter()) if policy.network == "none" else None
        python, roots = interpreter(req.python)
        pin = req.pin
        spec = ViewSpec(
            policy=policy,
            bwrap=str(settings.bwrap),
            python=python,
            python_roots=roots,
            tree=pin.site.parent.absolute() if pin else None,
            pkgs=(req.data_dir / "pkgs").absolute() if pin else None,
            scratch=self.scratch,
            script_fd=script_fd,
            script_dest=str(req.script.absolute()),
            hosts_fd=self._data_fd(NO_NET_HOSTS) if offline else None,
            resolv_fd=self._data_fd(STUB_RESOLV) if offline else None,
            seccomp_fd=seccomp_fd,
            drop_to=drop_to,
        )
        limits = ",".join(f"{name}={soft}:{hard}" for name, soft, hard in rlimits(policy.limits))
        tree = str(pin.site.absolute()) if pin else ""
        boot = [str(self._report_fd), str(stderr_fd), limits, tree, spec.script_dest, *req.args]
        # -B and no pycache_prefix: the stdlib's own bytecode is used and nothing is written. The
        # tree's pycache/ is left alone both ways: bytecode a sandboxed script could plant there
        # would run in the next run, and bytecode an unsandboxed one planted is not trusted here.
        cmd = [python, "-I", "-S", "-B", "-c", SANDBOX_BOOTSTRAP, *boot]
        argv = bwrap_argv(spec, cmd)
        self.argv = [argv[0], "--info-fd", str(self._info_fd), *argv[1:]]
        self.env = script_env(policy, req.caller_env)
        self.pass_fds = tuple(fd for fd in self._fds if fd != self.setup_log_fd)

    def _preflight(self) -> tuple[int, int] | None:
        req = self.request
        bwrap = req.settings.bwrap
        if not os.access(bwrap, os.X_OK):
            raise SandboxUnavailable(
                f"the sandbox needs bubblewrap at {bwrap}, which is missing or not executable:"
                " install it (apt-get install bubblewrap) or set [host] bwrap in the host policy;"
                " the script was not started"
            )
        data_dir = req.data_dir.resolve()
        for path in req.policy.read_only_paths + req.policy.read_write_paths:
            if not path.exists():
                raise SandboxUnavailable(
                    f"{req.policy.source}: {path} does not exist on this host, so it cannot be"
                    " bound into the sandbox; create it or remove it from the policy"
                )
        for path in req.policy.read_write_paths:
            real = path.resolve()
            if real.is_relative_to(data_dir) or data_dir.is_relative_to(real):
                raise InvalidArgument(
                    f"{req.policy.source}: sandbox.read_write_paths",
                    f"{path} overlaps the data dir {data_dir}; the tree is always read-only",
                )
        if os.geteuid() != 0:
            return None
        if not os.access(SETPRIV, os.X_OK):
            raise SandboxUnavailable(
                f"a root caller's sandbox drops to an unprivileged user with {SETPRIV}, which is"
                " missing: install util-linux; the script was not started"
            )
        return unprivileged_ids(req.settings.root_runs_as)

    def _open_script(self) -> int:
        # Read as the caller, so a script the run's own user cannot reach still runs.
        try:
            fd = os.open(self.request.script, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            rule = f"cannot read {self.request.script}: {exc.strerror}"
            raise InvalidArgument("script", rule) from None
        self._fds.append(fd)
        return fd

    def _tmpfile(self) -> int:
        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_APPEND, 0o600)
        self._fds.append(fd)
        return fd

    def _data_fd(self, data: bytes) -> int:
        fd = self._tmpfile()
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)  # bwrap reads from the current offset
        return fd

    # -- after the start -------------------------------------------------------------------------

    def events(self) -> list[list[str]]:
        """The bootstrap's reports as word lists, in order (the script shares the descriptor, so
        they only ever describe the run itself)."""
        raw = os.pread(self._report_fd, _REPORT_CAP, 0).decode(errors="replace")
        return [line.split(" ", 4) for line in raw.splitlines() if line]

    def limits_reported(self) -> list[str]:
        return [e[1] for e in self.events() if e[0] == "limit" and len(e) > 1]

    def started_pid(self) -> int | None:
        """The script's pid inside the sandbox, once the bootstrap has set the limits."""
        for event in self.events():
            if event[0] == "started" and len(event) > 1 and event[1].isdigit():
                return int(event[1])
        return None

    def final_status(self) -> tuple[int, int, float] | None:
        """(wait status, peak RSS in bytes, CPU seconds) of the script, from its reaper; None
        when the sandbox was killed as a whole (the timeout) before it could say."""
        for event in self.events():
            if event[0] == "status" and len(event) == 4:
                try:
                    return int(event[1]), int(event[2]) * 1024, float(event[3])
                except ValueError:
                    return None
        return None

    def init_pid(self) -> int | None:
        """The host pid of the sandbox's pid-namespace init: killing it kills every process."""
        try:
            info = json.loads(os.pread(self._info_fd, 4096, 0) or b"{}")
        except ValueError:
            return None
        pid = info.get("child-pid")
        return pid if isinstance(pid, int) else None

    def failure(self) -> SandboxUnavailable:
        """Why the script never started, with the fix."""
        for event in self.events():
            if event[0] == "refused" and len(event) == 5:
                return _refused_limit(event[1:], self.request.policy.source)
        text = os.pread(self.setup_log_fd, 8192, 0).decode(errors="replace").strip()
        text = " ".join(text.split()) or "no message"
        if "bwrap" in text and any(hint in text for hint in _USERNS_HINTS):
            cause = (
                f"user namespaces are not available to this user on this host ({text}); enable"
                " them (sysctl user.max_user_namespaces=15000, kernel.unprivileged_userns_clone=1"
                " on kernels that have it, or an AppArmor profile for bwrap where"
                " kernel.apparmor_restrict_unprivileged_userns=1)"
            )
        elif "Can't find source path" in text:
            cause = f"a path the sandbox binds is missing or closed to the run's user ({text})"
        else:
            cause = f"the sandbox could not be set up ({text})"
        return SandboxUnavailable(f"{cause}; the script was not started")


def _refused_limit(event: list[str], source: str) -> SandboxUnavailable:
    name, value, hard, error = event
    key = {
        "RLIMIT_CPU": "cpu_seconds",
        "RLIMIT_AS": "memory_bytes",
        "RLIMIT_NOFILE": "open_files",
        "RLIMIT_NPROC": "processes",
    }.get(name, name)
    return SandboxUnavailable(
        f"the kernel refuses the sandbox limit {key} = {value} ({error}; this host's hard limit"
        f" is {hard}): lower limits.{key} in {source} or raise the hard limit (ulimit -H,"
        " /etc/security/limits.conf); the script was not started"
    )


def _remove_stale_scratch(owner: int) -> None:
    """Scratch dirs of runners that died without cleaning up (SIGKILL), owned as ours would be."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if path.lstat().st_uid == owner and path.is_dir() and not path.is_symlink():
                _remove_scratch(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_scratch(path: Path) -> None:
    def writable_and_retry(func: Any, failed: str, _exc: Any) -> None:
        # A script may leave directories it made unwritable; the caller owns the scratch dir.
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable_and_retry)
    else:
        shutil.rmtree(path, onerror=writable_and_retry)
