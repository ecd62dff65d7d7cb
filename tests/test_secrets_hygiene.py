"""Canary secrets (registry token, admin token, satellite token) never leak: not in logs (text and
JSON), error messages, metrics, any process's argv during an install or a sync, nor in plaintext
in either data dir."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.prometheus_server import metrics_url, scrape
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

REGISTRY_CANARY = "canary-registry-7f3a9c1e5b"
ADMIN_CANARY = "canary-admin-token-4d2e8b6a0c"


class ArgvWatcher:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    self.seen.add(raw.replace(b"\0", b" ").decode(errors="replace"))
            time.sleep(0.005)

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _plaintext_hits(root: Path, canaries: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {c}" for c in canaries if c.encode() in data]
    return hits


def test_canaries_never_leak(tmp_path: Path, wheel_dir: Path) -> None:
    build_wheel(WheelSpec("alpha", "1.0", requires=["beta==1.0"]), wheel_dir)
    build_wheel(WheelSpec("beta", "1.0"), wheel_dir)
    errors: list[str] = []
    with PackageIndex(wheel_dir, token=REGISTRY_CANARY) as index:
        core = CoreProcess(tmp_path / "core", admin_token=ADMIN_CANARY)
        core.extra_args = ["--log-format", "json", "--metrics-listen", "127.0.0.1:0"]
        core.start()
        sat: SatelliteProcess | None = None
        scrapes: list[str] = []
        try:
            admin = core.admin(token=ADMIN_CANARY)
            admin.SetRegistryConfig(
                apb.SetRegistryConfigRequest(index_url=index.url, auth_token=REGISTRY_CANARY)
            )
            with ArgvWatcher() as watcher:
                admin.SetPackages(
                    apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="9.9")])
                )
                failed = admin.install_and_wait()
                errors.append(failed.error)
                admin.SetPackages(
                    apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="1.0")])
                )
                state = admin.install_and_wait()
                assert state.status == apb.INSTALL_STATUS_READY, state.error
                sat = SatelliteProcess(
                    core, "sat-canary", tmp_path, "--log-format", "json", "--metrics-listen",
                    "127.0.0.1:0",
                ).register()  # fmt: skip
                sat_token = sat.token_file.read_text()
                sat.start()
                eventually(lambda: sat is not None and sat.current() == state.lockfile_hash, 60)
            for bad in ("wrong-" + ADMIN_CANARY, sat_token):
                try:
                    core.admin(token=bad).ListPackages()
                except grpc.RpcError as exc:
                    errors.append(exc.details() or "")
            errors.append(str(admin.GetRegistryConfig()))
            errors.append(str(admin.ListSatellites()))
            for log_text in (core.log(), sat.log()):
                url = metrics_url(log_text)
                assert url is not None, log_text[-2000:]
                scrapes.append(scrape(url))
        finally:
            if sat is not None:
                sat.stop()
            core.stop()

    canaries = [REGISTRY_CANARY, ADMIN_CANARY, sat_token]
    assert any("--python-platform" in argv for argv in watcher.seen), "uv never ran while watched"
    leaks = [f"argv: {a[:120]}" for a in watcher.seen for c in canaries if c in a]
    leaks += [f"error: {e[:120]}" for e in errors for c in canaries if c in e]
    leaks += [f"core log: {c}" for c in canaries if c in core.log()]
    leaks += [f"satellite log: {c}" for c in canaries if sat and c in sat.log()]
    leaks += [f"metrics: {c}" for c in canaries for text in scrapes if c in text]
    assert len(scrapes) == 2 and all("spk_" in text for text in scrapes)
    assert core.log().startswith("{") and sat is not None and sat.log().startswith("{")
    leaks += _plaintext_hits(core.data_dir, canaries)
    if sat is not None:
        leaks += _plaintext_hits(sat.data_dir, canaries)
    assert not leaks, leaks


def test_secrets_come_from_systemd_credentials(tmp_path: Path) -> None:
    """LoadCredential=SPK_ADMIN_TOKEN:... puts the token in a file of $CREDENTIALS_DIRECTORY;
    the core reads it there, so the environment need not hold it."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "SPK_ADMIN_TOKEN").write_text(ADMIN_CANARY + "\n")
    env = {"SPK_ADMIN_TOKEN": "", "CREDENTIALS_DIRECTORY": str(creds)}
    core = CoreProcess(tmp_path / "core", env=env, admin_token=ADMIN_CANARY).start()
    try:
        assert core.admin(token=ADMIN_CANARY).ListPackages().packages == []
        environ = Path(f"/proc/{core.proc.pid}/environ").read_bytes() if core.proc else b""
        assert ADMIN_CANARY.encode() not in environ
    finally:
        core.stop()
