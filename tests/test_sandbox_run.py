"""Sandboxed `spk-satellite run`: real bwrap, real interpreters, real trees, as root (like CI).

Every test runs the real CLI in a subprocess and lets the script report what it could do on
stdout: the sandbox has no path back to the test's files, which is the point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from satellite.host_policy import HOST_POLICY
from satellite.run_outcome import RunLog
from satellite.store import SatelliteStore
from satellite.sync import AgentState
from tests.test_runner import PROBE, build_tree

REPO = Path(__file__).resolve().parents[1]
Ready = tuple[SatelliteStore, str]


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    # Not a skip: a sandbox that silently does not exist is what these tests guard against.
    assert os.access("/usr/bin/bwrap", os.X_OK), "install bubblewrap (.ci/run does)"


@pytest.fixture
def ready(tmp_path: Path) -> Ready:
    store = SatelliteStore(tmp_path / "data")
    lockfile_hash = build_tree(store, tmp_path / "wheels", "1.0")
    store.flip_current(lockfile_hash)
    store.save_state(AgentState(desired_hash=lockfile_hash, status="ready"))
    return store, lockfile_hash


@pytest.fixture
def scratch_parent(tmp_path: Path) -> Path:
    path = tmp_path / "tmpdir"
    path.mkdir()
    return path


def script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def policy_file(tmp_path: Path, body: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    path.chmod(0o644)
    return path


def run_argv(store: SatelliteStore, *args: str) -> list[str]:
    return [sys.executable, "-m", "satellite.cli", "run", "--data-dir", str(store.root), *args]


def cli(
    store: SatelliteStore,
    *args: str,
    scratch_parent: Path | None = None,
    env: dict[str, str] | None = None,
    **kw: object,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if scratch_parent is not None:
        full_env["TMPDIR"] = str(scratch_parent)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        run_argv(store, *args),
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
        cwd=REPO,
        **kw,
    )


def last_outcome(store: SatelliteStore) -> dict[str, object]:
    (record,) = RunLog(store.root).last(1)
    return record


def leftovers(marker: str, interpreters_only: bool = False) -> list[int]:
    """Processes whose command line mentions `marker` (a script path): none may outlive a run.
    With `interpreters_only`, only the script's own (the bootstrap's reaper, the script, its
    forks), not the runner and bwrap, whose command lines hold the script path too."""
    python = os.path.realpath(sys.executable).encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            ours = not interpreters_only or cmdline.split(b"\0")[0] == python
            if marker.encode() in cmdline and ours:
                found.append(int(name))
    return found


@pytest.fixture
def loopback_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that the host can reach (checked) and a sandbox must not."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.sendall(b"hello")
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        assert probe.recv(5) == b"hello"  # the host reaches it
    yield port
    stop.set()
    thread.join(5)
    server.close()


CONTAINMENT = """
    import errno, json, os, socket, sys
    port, tree, pkgs, data, home, token = sys.argv[1:7]
    out = {"uid": os.getuid(), "env": sorted(os.environ)}
    status = open("/proc/self/status").read()
    out["caps"] = [l.split()[1] for l in status.splitlines() if l.startswith("CapEff")][0]
    out["no_new_privs"] = [l.split()[1] for l in status.splitlines() if l.startswith("NoNewPr")][0]
    def attempt(name, action):
        try:
            action()
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
    def connect(family, addr):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(addr)
    attempt("connect", lambda: connect(socket.AF_INET, ("127.0.0.1", int(port))))
    attempt("resolve", lambda: socket.getaddrinfo("pypi.org", 443))
    attempt("write_site", lambda: open(os.path.join(tree, "site-packages", "x.py"), "w"))
    attempt("write_tree", lambda: open(os.path.join(tree, "x"), "w"))
    attempt("write_pkgs", lambda: open(os.path.join(pkgs, "x"), "w"))
    attempt("write_etc", lambda: open("/etc/x", "w"))
    attempt("write_home", lambda: open(os.path.join(home, "x"), "w"))
    attempt("write_data", lambda: open(os.path.join(data, "x"), "w"))
    attempt("read_token", lambda: open(token).read())
    attempt("read_state", lambda: open(os.path.join(data, "state.json")).read())
    attempt("write_scratch", lambda: open("/tmp/x", "w").write("scratch"))
    attempt("write_tmpdir", lambda: open(os.path.join(os.environ["TMPDIR"], "y"), "w").close())
    print(json.dumps(out))
"""


def test_default_policy_contains_the_script(
    ready: Ready, tmp_path: Path, scratch_parent: Path, loopback_server: int
) -> None:
    store, lockfile_hash = ready
    tree = store.trees.dir(lockfile_hash)
    token = tmp_path / "sat.token"  # where tests/satellite_process.py keeps the agent's token
    token.write_text("satellite-token-value")
    token.chmod(0o600)
    # World-writable directories of the tree and the package cache: a write that still fails
    # is stopped by the read-only mount (EROFS), not by permission bits that root ignores.
    opened = [tree / "site-packages", store.root / "pkgs", tree]
    for path in opened:
        path.chmod(0o777)
    args = [
        str(loopback_server),
        str(tree),
        str(store.root / "pkgs"),
        str(store.root),
        str(Path.home()),
        str(token),
    ]
    secrets = {"SPK_ADMIN_TOKEN": "admin-secret", "MY_API_KEY": "k"}
    try:
        proc = cli(
            store,
            "--sandbox",
            str(script(tmp_path, CONTAINMENT)),
            *args,
            scratch_parent=scratch_parent,
            env=secrets,
        )
    finally:
        for path in opened:
            path.chmod(0o555 if path != tree else 0o755)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == 0  # root inside, as the caller is...
    assert (out["caps"], out["no_new_privs"]) == ("0000000000000000", "1")  # ...without power
    assert out["connect"] == "EAFNOSUPPORT"  # no IP socket at all under network = "none"
    assert out["resolve"] != "ok"
    for where in ("write_site", "write_tree", "write_pkgs", "write_etc"):
        assert out[where] == "EROFS", (where, out)
    for where in ("write_home", "write_data", "read_token", "read_state"):
        assert out[where] in ("ENOENT", "EACCES", "EROFS"), (where, out)
    assert (out["write_scratch"], out["write_tmpdir"]) == ("ok", "ok")
    assert set(out["env"]) <= {"HOME", "LANG", "LC_ALL", "LC_CTYPE", "PATH", "PWD", "TERM"} | {
        "TMPDIR",
        "TZ",
    }
    assert store.verify_tree(lockfile_hash) == []
    assert not (store.root / "pkgs" / "x").exists() and not Path("/etc/x").exists()
    assert list(scratch_parent.iterdir()) == []  # the scratch dir went with the run


def test_loopback_policy_has_only_its_own_loopback(
    ready: Ready, tmp_path: Path, loopback_server: int
) -> None:
    store, _ = ready
    body = """
        import socket, sys
        own = socket.create_server(("127.0.0.1", 0))  # the sandbox's own loopback works
        with socket.create_connection(own.getsockname(), timeout=3):
            pass
        try:
            socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
            print("reached the host")
        except OSError as exc:
            print("refused", exc.errno)
    """
    proc = cli(store, "--sandbox=loopback", str(script(tmp_path, body)), str(loopback_server))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "refused"  # the host's loopback is another namespace
    hosted = cli(store, "--sandbox=network", str(script(tmp_path, body)), str(loopback_server))
    assert hosted.stdout.strip() == "reached the host"  # network = "host", explicitly


def test_imports_come_from_the_tree_only(ready: Ready, tmp_path: Path) -> None:
    store, lockfile_hash = ready
    probe = PROBE.replace(
        'open(sys.argv[1], "w").write(json.dumps(result))', "print(json.dumps(result))"
    )
    proc = cli(store, "--sandbox", str(script(tmp_path, probe)), "arg")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["argv"] == ["arg"]
    assert result["allowed"] == "1.0"
    assert (result["google.a"], result["google.b"]) == (1, 2)
    for blocked in ("peewee", "pip", "grpc"):  # all installed in the agent's venv
        assert result[blocked].startswith("ImportError"), blocked
    assert str(store.tree_site(lockfile_hash)) in result["path"]
    assert not any("site-packages" in p and lockfile_hash not in p for p in result["path"])
    assert not (store.trees.dir(lockfile_hash) / "pycache").exists()  # nothing written


@pytest.mark.parametrize(
    ("name", "body", "stopped_by", "code"),
    [
        ("bomb", "import os\nwhile True:\n    os.fork()\n", "processes", 1),
        ("hog", "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n", "memory", 1),
        ("spin", "while True:\n    pass\n", "cpu", 128 + signal.SIGXCPU),
        ("sleeper", "import time\ntime.sleep(600)\n", "timeout", 128 + signal.SIGKILL),
    ],
)
def test_each_limit_stops_its_run_reports_it_and_leaves_nothing(
    ready: Ready, tmp_path: Path, name: str, body: str, stopped_by: str, code: int
) -> None:
    store, _ = ready
    policy = policy_file(
        tmp_path,
        """
        [sandbox]
        timeout_seconds = 3
        [sandbox.limits]
        cpu_seconds = 1
        memory_bytes = "256MiB"
        processes = 32
        """,
    )
    path = script(tmp_path, body, f"{name}.py")
    started = time.monotonic()
    proc = cli(store, f"--sandbox={policy}", str(path))
    assert time.monotonic() - started < 30
    assert proc.returncode == code, proc.stderr
    outcome = last_outcome(store)
    assert outcome["stopped_by"] == stopped_by
    assert f"stopped by the {stopped_by} limit" in proc.stderr
    assert leftovers(str(path)) == []
    if name == "hog":
        assert 100 << 20 < int(outcome["peak_memory_bytes"]) <= 256 << 20  # type: ignore[call-overload]
    if name == "spin":
        assert float(outcome["cpu_seconds"]) >= 0.9  # type: ignore[arg-type]
        assert outcome["signal"] == signal.SIGXCPU


def test_a_fork_bomb_that_survives_its_errors_never_exceeds_the_limit(
    ready: Ready, tmp_path: Path
) -> None:
    store, _ = ready
    policy = policy_file(
        tmp_path, "[sandbox]\ntimeout_seconds = 3\n[sandbox.limits]\nprocesses = 16\n"
    )
    path = script(
        tmp_path,
        """
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.001)
        """,
        "stubborn.py",
    )
    proc = subprocess.Popen(
        run_argv(store, f"--sandbox={policy}", str(path)),
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    most = 0
    while proc.poll() is None:
        most = max(most, len(leftovers(str(path), interpreters_only=True)))
        time.sleep(0.05)
    assert proc.returncode == 128 + signal.SIGKILL
    # The bootstrap's reaper, the script and its forks: what the kernel let through, counted
    # per user namespace (as root too: the run is not root outside its namespace).
    assert 8 < most <= 16
    outcome = last_outcome(store)
    assert outcome["stopped_by"] == "timeout"
    assert "processes" in outcome["limits_hit"]  # type: ignore[operator]
    assert leftovers(str(path)) == []


def test_a_pinned_sandboxed_run_survives_a_flip_and_gc(ready: Ready, tmp_path: Path) -> None:
    store, first = ready
    body = """
        import sys
        import allowed
        print("started", allowed.VERSION, flush=True)
        sys.stdin.readline()
        del sys.modules["allowed"]
        import allowed  # from disk again, after the flip and the GC pass
        print("after", allowed.VERSION, flush=True)
    """
    proc = subprocess.Popen(
        run_argv(store, "--sandbox", str(script(tmp_path, body))),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().split() == ["started", "1.0"]
        second = build_tree(store, tmp_path / "wheels2", "2.0", sequence=2)
        store.flip_current(second)
        store.save_state(AgentState(desired_hash=second))
        store.retire_others(now=0.0)
        assert store.gc_trees(grace_seconds=0, now=10.0) == []  # pinned by the sandboxed run
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.split() == ["after", "1.0"]
    assert store.gc_trees(grace_seconds=0, now=10.0) == [first]


def test_signals_reach_the_sandboxed_script(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    body = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
        print("ready", flush=True)
        time.sleep(60)
    """
    path = script(tmp_path, body)
    proc = subprocess.Popen(
        run_argv(store, "--sandbox", str(path)),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 42
    finally:
        proc.kill()
    assert leftovers(str(path)) == []


# --- fail closed ---------------------------------------------------------------------------


MARKER_BODY = "open({marker!r}, 'w').close()\n"


def refused(proc: subprocess.CompletedProcess[str], marker: Path, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "the script was not started" in proc.stderr
    assert not marker.exists()  # it never ran, sandboxed or not


def test_a_mandatory_policy_without_bwrap_is_refused(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    marker = tmp_path / "ran"
    policy_file(store.root, '[host]\nbwrap = "/nonexistent/bwrap"\n', HOST_POLICY)
    path = script(tmp_path, MARKER_BODY.format(marker=str(marker)))
    proc = cli(store, str(path))  # no --sandbox: the host policy makes it mandatory
    refused(proc, marker, "bubblewrap at /nonexistent/bwrap", "apt-get install bubblewrap")
    assert RunLog(store.root).last(1) == []


def test_a_host_without_user_namespaces_refuses_the_run(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    marker = tmp_path / "ran"
    policy_file(store.root, "[sandbox]\nnetwork = 'none'\n", HOST_POLICY)
    path = script(tmp_path, MARKER_BODY.format(marker=str(marker)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.userns_denied", *run_argv(store, str(path))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    refused(proc, marker, "user namespaces are not available", "user.max_user_namespaces")


def test_a_limit_the_kernel_refuses_is_refused(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    marker = tmp_path / "ran"
    policy_file(store.root, "[sandbox.limits]\nopen_files = 1073741824\n", HOST_POLICY)
    path = script(tmp_path, MARKER_BODY.format(marker=str(marker)))
    refused(cli(store, str(path)), marker, "refuses the sandbox limit open_files = 1073741824")


def test_an_untrusted_host_policy_is_refused(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    marker = tmp_path / "ran"
    host = policy_file(store.root, "[sandbox]\n", HOST_POLICY)
    os.chown(host, 65534, 65534)
    path = script(tmp_path, MARKER_BODY.format(marker=str(marker)))
    proc = cli(store, str(path))
    assert proc.returncode == 1 and "owned by uid 65534, not root" in proc.stderr
    assert not marker.exists()


def test_a_mandatory_policy_cannot_be_weakened_from_the_command_line(
    ready: Ready, tmp_path: Path
) -> None:
    store, _ = ready
    marker = tmp_path / "ran"
    policy_file(store.root, "[sandbox]\nnetwork = 'none'\n", HOST_POLICY)
    path = script(tmp_path, MARKER_BODY.format(marker=str(marker)))
    proc = cli(store, "--sandbox=network", str(path))
    assert proc.returncode == 1 and "cannot weaken the host policy" in proc.stderr
    assert not marker.exists()
    proc = cli(store, str(path))  # and without --sandbox it runs, sandboxed: no marker
    assert proc.returncode == 1 and "Error: [Errno" in proc.stderr  # EACCES or ENOENT inside
    assert not marker.exists()
    assert last_outcome(store)["sandbox"] == f"host policy {store.root / HOST_POLICY}"


def test_a_killed_runner_takes_its_sandbox_along(
    ready: Ready, tmp_path: Path, scratch_parent: Path
) -> None:
    store, _ = ready
    path = script(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(60)\n", "long.py")
    proc = subprocess.Popen(
        run_argv(store, "--sandbox", str(path)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch_parent)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    proc.kill()  # SIGKILL: no cleanup of its own
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while leftovers(str(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(str(path)) == []  # --die-with-parent, then the pid namespace
    (stale,) = scratch_parent.iterdir()  # the one thing SIGKILL leaves: its scratch dir...
    after = cli(store, "--sandbox", str(script(tmp_path, "pass\n")), scratch_parent=scratch_parent)
    assert after.returncode == 0, after.stderr
    assert not stale.exists()  # ...which the next run from the same temp dir removes
