"""The bubblewrap command line of a sandboxed run: what the script sees and which namespaces.

The script's file system is a fresh tmpfs holding only read-only binds of what a run needs:

    /usr, /bin, /lib*, /etc       the system (merged-/usr links kept as links); without network,
                                  /etc/hosts and /etc/resolv.conf are replaced (localhost only)
    <python prefix>               the interpreter and its stdlib (-I -S: nothing else of it runs)
    <data>/trees/<hash>           the pinned tree, and <data>/pkgs/ its links point into; never
                                  state.json, blobs/, the host policy or anything else there
    <script>                      a copy (--ro-bind-data), read by the caller: works when the
                                  script's directory is closed to the user the run becomes
    /tmp                          the run's scratch dir (read-write, removed afterwards);
                                  /dev/shm a 64 MiB tmpfs; /proc of the run's pid namespace
    read_only_paths / read_write_paths of the policy, at their own paths

Every bind is read-only at the mount level (MS_RDONLY): root inside gets EROFS, not EACCES, and
cannot remount without capabilities. Namespaces: user (unless the outer layer of a root run),
pid, ipc, uts, cgroup, and net unless `network = "host"`.

A root caller gets two layers (docs/sandbox.md, "root"): bwrap as root builds the view (binding
paths only root can traverse, such as /root/.pyenv), `setpriv` drops to `root_runs_as`, and an
unprivileged inner bwrap adds the user namespace. The kernel exempts uid 0 from RLIMIT_NPROC
whatever its capabilities, so a fork bomb is only stopped once the run is not root outside.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from satellite.sandbox_policy import SandboxPolicy

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
SETPRIV = "/usr/bin/setpriv"
SCRATCH_DEST = "/tmp"
SHM_BYTES = 64 << 20
NO_NET_HOSTS = b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"


@dataclass
class Mount:
    kind: str  # "ro", "rw", "data" (source is an fd), "symlink" (source is the link text)
    dest: str
    source: str


@dataclass
class ViewSpec:
    """What the run needs bound; built by satellite.sandbox, turned into argv here."""

    policy: SandboxPolicy
    bwrap: str
    python: str  # the real interpreter (no venv: -I -S uses none of it)
    python_roots: Sequence[Path]
    tree: Path | None  # trees/<hash>
    pkgs: Path | None
    scratch: Path
    script_fd: int
    script_dest: str
    hosts_fd: int | None  # replacement /etc/hosts (no network)
    resolv_fd: int | None
    seccomp_fd: int | None
    drop_to: tuple[int, int] | None  # (uid, gid) for a root caller: two layers
    extra: list[Mount] = field(default_factory=list)


def interpreter(python: str) -> tuple[str, list[Path]]:
    """The real binary behind `python` (venv links resolved) and the directories it needs."""
    real = os.path.realpath(python)
    if real == os.path.realpath(sys.executable):
        roots = {Path(sys.base_prefix), Path(sys.base_exec_prefix)}
    else:
        roots = {Path(real).parent.parent}  # <prefix>/bin/pythonX.Y
        cfg = Path(real).parent.parent / "pyvenv.cfg"  # a venv made with --copies
        if cfg.is_file():
            for line in cfg.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    roots.add(Path(value.strip()).parent)
    covered = [Path(d) for d in SYSTEM_DIRS]
    return real, sorted(r for r in roots if not any(r.is_relative_to(c) for c in covered))


def bwrap_argv(spec: ViewSpec, inner: list[str]) -> list[str]:
    """The whole command: bwrap [setpriv bwrap] python ...; `inner` is python and its argv."""
    policy = spec.policy
    ns = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if policy.network != "host":
        ns.append("--unshare-net")
    common = ["--die-with-parent", "--chdir", SCRATCH_DEST]
    seccomp = ["--seccomp", str(spec.seccomp_fd)] if spec.seccomp_fd is not None else []
    view = _view_args(spec)
    outer = [spec.bwrap, *ns, "--new-session", "--hostname", "spk-run", "--die-with-parent"]
    if spec.drop_to is None:
        user = ["--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--chdir", SCRATCH_DEST]
        return [*outer, *user, *view, *seccomp, "--", *inner]
    uid, gid = spec.drop_to
    # setpriv needs CAP_SETUID/SETGID; the switch to a non-root uid then clears every capability.
    keep = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    keep += ["--chdir", "/"]  # the scratch dir is the run user's, closed to root without caps
    drop = [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    # The inner layer sees the outer view as its host; `--bind / /` keeps every read-only flag
    # (mounts inherited into a less privileged user namespace are locked).
    inner_layer = [
        spec.bwrap,
        "--unshare-user",
        "--disable-userns",
        "--uid",
        "0",
        "--gid",
        "0",
        "--cap-drop",
        "ALL",
        *common,
        "--bind",
        "/",
        "/",
        *seccomp,
        "--",
    ]
    return [*outer, *keep, *view, "--", *drop, *inner_layer, *inner]


def _mounts(spec: ViewSpec) -> list[Mount]:
    mounts: list[Mount] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            mounts.append(Mount("symlink", d, os.readlink(d)))
        elif os.path.isdir(d):
            mounts.append(Mount("ro", d, d))
    if spec.hosts_fd is not None and _is_plain_file("/etc/hosts"):
        mounts.append(Mount("data", "/etc/hosts", str(spec.hosts_fd)))
    if spec.resolv_fd is not None and _is_plain_file("/etc/resolv.conf"):
        mounts.append(Mount("data", "/etc/resolv.conf", str(spec.resolv_fd)))
    mounts += [Mount("ro", str(p), str(p)) for p in spec.python_roots]
    if not spec.bwrap.startswith("/usr/") and spec.drop_to is not None:
        mounts.append(Mount("ro", spec.bwrap, spec.bwrap))  # the inner layer runs it too
    mounts.append(Mount("rw", SCRATCH_DEST, str(spec.scratch)))
    mounts += [Mount("ro", str(p), str(p)) for p in spec.policy.read_only_paths]
    mounts += [Mount("rw", str(p), str(p)) for p in spec.policy.read_write_paths]
    # After the policy's paths, so a read-only tree wins even under a path listed read-write.
    for path in (spec.pkgs, spec.tree):
        if path is not None:
            mounts.append(Mount("ro", str(path), str(path)))
    mounts.append(Mount("data", spec.script_dest, str(spec.script_fd)))
    return mounts + spec.extra


def _is_plain_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _view_args(spec: ViewSpec) -> list[str]:
    # Shallow destinations first (a bind hides what an earlier, deeper one put under it), and
    # every missing parent made 0755: bwrap makes them 0700 as root, closed to the user a root
    # caller's run becomes. Parents inside a read-only bind exist already (same-path binds).
    mounts = sorted(_mounts(spec), key=lambda m: m.dest.count("/"))
    args: list[str] = []
    made: set[str] = {"/"}
    read_only: list[str] = []
    for m in mounts:
        for parent in _parents(m.dest):
            if parent in made or any(_under(parent, r) for r in read_only):
                continue
            args += ["--perms", "0755", "--dir", parent]
            made.add(parent)
        if m.kind == "symlink":
            args += ["--symlink", m.source, m.dest]
        elif m.kind == "data":
            args += ["--perms", "0444", "--ro-bind-data", m.source, m.dest]
        else:
            args += ["--ro-bind" if m.kind == "ro" else "--bind", m.source, m.dest]
            if m.kind == "ro":
                read_only.append(m.dest)
        made.add(m.dest)
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm"]
    return args


def _parents(dest: str) -> list[str]:
    parts = dest.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
