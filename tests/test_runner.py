"""`spk-satellite run`: real interpreters against real trees built from real wheels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from satellite.runner import resolve, run_script, status
from satellite.store import SatelliteStore
from satellite.sync import AgentState
from shared.errors import FailedPrecondition
from tests.core_process import eventually
from tests.test_satellite_store import make_manifest, materialise, wheel_entry
from tests.wheelfactory import WheelSpec

REPO = Path(__file__).resolve().parents[1]
NAMESPACE_INIT = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def build_tree(store: SatelliteStore, out: Path, version: str, sequence: int = 1) -> str:
    """A tree with `allowed` (VERSION = version) and two wheels sharing the `google` namespace."""
    specs = [
        WheelSpec(
            "allowed", version, files={"allowed/__init__.py": f"VERSION = {version!r}\n".encode()}
        ),
        WheelSpec(
            "ns-a",
            "1.0",
            files={"google/__init__.py": NAMESPACE_INIT, "google/a/__init__.py": b"A = 1\n"},
        ),
        WheelSpec(
            "ns-b",
            "1.0",
            files={"google/__init__.py": NAMESPACE_INIT, "google/b/__init__.py": b"B = 2\n"},
        ),
    ]
    built = [wheel_entry(out, spec) for spec in specs]
    manifest = make_manifest([e for e, _ in built], sequence=sequence)
    materialise(store, manifest, {e.sha256: d for e, d in built})
    return manifest.lockfile_hash


def script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


PROBE = """
    import json, sys
    result = {"argv": sys.argv[1:], "path": sys.path}
    for name in ("allowed", "google.a", "google.b", "peewee", "pip", "grpc"):
        try:
            module = __import__(name, fromlist=["*"])
            result[name] = getattr(module, "VERSION", None) or getattr(module, "A", None) \\
                or getattr(module, "B", None) or "imported"
        except ImportError as exc:
            result[name] = f"ImportError: {exc}"
    open(sys.argv[1], "w").write(json.dumps(result))
"""


Ready = tuple[SatelliteStore, str]


@pytest.fixture
def ready(tmp_path: Path) -> Ready:
    store = SatelliteStore(tmp_path / "data")
    lockfile_hash = build_tree(store, tmp_path / "wheels", "1.0")
    store.flip_current(lockfile_hash)
    store.save_state(AgentState(desired_hash=lockfile_hash, status="ready"))
    return store, lockfile_hash


def test_script_sees_the_tree_and_nothing_else(ready: Ready, tmp_path: Path) -> None:
    store, lockfile_hash = ready
    out = tmp_path / "out.json"
    assert run_script(store, script(tmp_path, PROBE), [str(out), "--flag"]) == 0
    result = json.loads(out.read_text())
    assert result["argv"] == [str(out), "--flag"]
    assert result["allowed"] == "1.0"
    assert (result["google.a"], result["google.b"]) == (1, 2)  # one namespace, two wheels
    for blocked in ("peewee", "pip", "grpc"):  # all installed in the agent's venv
        assert result[blocked].startswith("ImportError"), blocked
    assert str(store.tree_site(lockfile_hash)) in result["path"]
    assert not any("site-packages" in p and lockfile_hash not in p for p in result["path"])
    # Bytecode went to the tree's cache, not into the sealed tree.
    assert store.verify_tree(lockfile_hash) == []
    assert list((store.trees.dir(lockfile_hash) / "pycache").rglob("*.pyc"))


def test_exit_codes_pass_through(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    assert run_script(store, script(tmp_path, "import sys\nsys.exit(7)\n"), []) == 7
    assert run_script(store, script(tmp_path, "exit(3)\n"), []) == 3  # the builtin -S drops
    assert run_script(store, script(tmp_path, "raise RuntimeError('boom')\n"), []) == 1
    assert (
        run_script(
            store, script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"), []
        )
        == 128 + 9
    )


def test_not_ready_refuses_with_expected_and_actual(tmp_path: Path, ready: Ready) -> None:
    store, lockfile_hash = ready
    store.save_state(AgentState(desired_hash="b" * 64))
    with pytest.raises(FailedPrecondition) as info:
        run_script(store, script(tmp_path, "pass\n"), [])
    assert (
        f"packages not ready on this satellite: expected {'b' * 64}, have {lockfile_hash}"
        in str(info.value)
    )

    empty = SatelliteStore(tmp_path / "empty")
    empty.save_state(AgentState(desired_hash="c" * 64))
    with pytest.raises(FailedPrecondition, match=f"expected {'c' * 64}, have none"):
        run_script(empty, script(tmp_path, "pass\n"), [])


def test_nothing_desired_runs_without_packages(tmp_path: Path, ready: Ready) -> None:
    store, _ = ready
    store.save_state(AgentState(desired_hash=""))
    out = tmp_path / "out.json"
    assert run_script(store, script(tmp_path, PROBE), [str(out)]) == 0
    assert json.loads(out.read_text())["allowed"].startswith("ImportError")
    assert resolve(store).state == "none"


def test_a_flip_during_a_run_does_not_affect_it(ready: Ready, tmp_path: Path) -> None:
    store, first = ready
    go, out = tmp_path / "go", tmp_path / "out.txt"
    body = f"""
        import os, sys, time
        open({str(tmp_path / "started")!r}, "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        import allowed  # imported only after the flip
        open({str(out)!r}, "w").write(allowed.VERSION)
    """
    codes: list[int] = []
    runner = threading.Thread(
        target=lambda: codes.append(run_script(store, script(tmp_path, body), []))
    )
    runner.start()
    try:
        eventually(lambda: (tmp_path / "started").exists())
        second = build_tree(store, tmp_path / "wheels2", "2.0", sequence=2)
        store.flip_current(second)
        store.save_state(AgentState(desired_hash=second))
        store.retire_others(now=0.0)
        assert store.gc_trees(grace_seconds=0, now=10.0) == []  # pinned by the run
        go.touch()
    finally:
        runner.join(timeout=30)
    assert codes == [0]
    assert out.read_text() == "1.0"
    assert store.gc_trees(grace_seconds=0, now=10.0) == [first]  # the pin died with the run


def test_signals_are_forwarded_to_the_script(ready: Ready, tmp_path: Path) -> None:
    store, _ = ready
    body = f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
        open({str(tmp_path / "started")!r}, "w").close()
        time.sleep(60)
    """
    path = script(tmp_path, body)
    driver = (
        "import sys; from pathlib import Path; from satellite.store import SatelliteStore;"
        " from satellite.runner import run_script;"
        f" sys.exit(run_script(SatelliteStore(Path({str(store.root)!r})), {str(path)!r}, []))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env, stdin=subprocess.DEVNULL)
    try:
        eventually(lambda: (tmp_path / "started").exists())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 42
    finally:
        proc.kill()


def test_status_reports_hashes_state_and_size(ready: Ready) -> None:
    store, lockfile_hash = ready
    report = status(store)
    assert report["desired_hash"] == report["current_hash"] == lockfile_hash
    assert (report["state"], report["sync_status"], report["last_error"]) == ("ready", "ready", "")
    assert isinstance(report["tree_size_bytes"], int) and report["tree_size_bytes"] > 0
    store.save_state(AgentState(desired_hash="d" * 64, status="error", error="boom"))
    report = status(store)
    assert (report["state"], report["last_error"]) == ("not_ready", "boom")


def test_a_relative_data_dir_survives_chdir(
    ready: Ready, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ready[0].root == tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    relative = SatelliteStore(Path("data"))
    body = (
        "import os\nos.chdir('/')\nimport allowed\nraise SystemExit(40 + int(allowed.VERSION[0]))\n"
    )
    assert run_script(relative, script(tmp_path, body), []) == 41  # not 1: no ImportError
