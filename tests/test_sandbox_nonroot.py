"""The sandbox for a caller that is not root: one unprivileged bwrap layer (the usual case on a
multi-user host). The tests run as root, so the caller here is `nobody`, running the project
with the system's python3.11 (the venv's interpreter lives under /root, closed to nobody)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from satellite.store import SatelliteStore
from satellite.sync import AgentState
from tests.test_runner import build_tree

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.skipif(
    not SYSTEM_PYTHON.exists() or os.geteuid() != 0,
    reason=f"needs root (to become nobody) and {SYSTEM_PYTHON} for nobody to run the project with",
)


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """pytest's tmp_path is closed to other users; this one is not."""
    path = Path(tempfile.mkdtemp(prefix="spk-nonroot-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "PYTHONPATH": f"{REPO}:{SITE / 'site-packages'}",
        "GRPC_ENABLE_FORK_SUPPORT": "false",
    }
    nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    cli = [str(SYSTEM_PYTHON), "-m", "satellite.cli", "run", "--data-dir", str(data_dir)]
    return subprocess.run(
        [*nobody, *cli, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd="/",
    )


BODY = """
    import errno, json, os, socket, sys
    import allowed
    out = {"uid": os.getuid(), "allowed": allowed.VERSION}
    def attempt(name, action):
        try:
            action()
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
    attempt("write_tree", lambda: open(os.path.join(sys.path[-1], "x.py"), "w"))
    attempt("socket", lambda: socket.socket())
    attempt("scratch", lambda: open("/tmp/x", "w").close())
    kids = 0
    try:
        while True:
            if os.fork() == 0:
                __import__("time").sleep(5)
                os._exit(0)
            kids += 1
    except OSError:
        out["forks"] = kids
    print(json.dumps(out), flush=True)
    os.killpg(0, 9)
"""


def test_an_unprivileged_caller_gets_the_single_layer_sandbox(world_readable: Path) -> None:
    store = SatelliteStore(world_readable / "data")
    lockfile_hash = build_tree(store, world_readable / "wheels", "1.0")
    store.flip_current(lockfile_hash)
    store.save_state(AgentState(desired_hash=lockfile_hash, status="ready"))
    site = store.tree_site(lockfile_hash)
    site.chmod(0o777)  # so only the read-only mount can stop the write
    script = world_readable / "s.py"
    script.write_text(textwrap.dedent(BODY))
    policy = world_readable / "p.toml"
    policy.write_text("[sandbox.limits]\nprocesses = 12\n")
    try:
        proc = as_nobody(store.root, f"--sandbox={policy}", str(script))
    finally:
        site.chmod(0o555)
    out = json.loads(proc.stdout.splitlines()[0])
    assert out["uid"] == 65534 and out["allowed"] == "1.0"  # the caller's own uid inside
    assert (out["write_tree"], out["socket"], out["scratch"]) == ("EROFS", "EAFNOSUPPORT", "ok")
    # 12 processes in this run's user namespace: bwrap's init, the reaper, the script and 9
    # forks, whatever else the same uid runs on the host.
    assert out["forks"] == 9
    # nobody cannot write the data dir, so the outcome is not recorded, said once, run intact.
    assert "run outcome not recorded" in proc.stderr
    assert store.verify_tree(lockfile_hash) == []
