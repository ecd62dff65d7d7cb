"""systemd: the unit files pass `systemd-analyze verify` (and a hardening score), the core and
the agent speak the notify protocol on a real datagram socket set as NOTIFY_SOCKET, and health
goes NOT_SERVING while a core drains on SIGTERM."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.sd_notify import Notifier
from tests.core_process import CoreProcess, eventually, eventually_async
from tests.satellite_process import SatelliteProcess

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SECRET_VARS = ("SPK_ADMIN_TOKEN", "SPK_SECRET_KEY", "SPK_DATABASE_URL", "SPK_S3_SECRET")


def _unit(path: Path) -> configparser.RawConfigParser:
    text = path.read_text().replace("\\\n", " ")
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


@pytest.mark.parametrize("name", ["spk-core.service", "spk-satellite.service"])
def test_unit_files_verify_and_are_hardened(name: str, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE, "systemd-analyze missing (Debian package systemd; .ci/run installs it)"
    unit = _unit(UNITS / name)["Service"]
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["Restart"] == "on-failure" and unit["WatchdogSec"]
    assert unit["NoNewPrivileges"] == "yes" and unit["PrivateTmp"] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"].startswith("/var/lib/spk-")
    assert unit["User"].startswith("spk-") and unit["LoadCredential"]
    assert not [v for v in SECRET_VARS if v in unit.get("Environment", "")]
    # verify needs ExecStart's binary to exist: point it at a stand-in this test creates.
    binary = tmp_path / "bin" / unit["ExecStart"].split()[0].rsplit("/", 1)[-1]
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    copy = tmp_path / name
    copy.write_text(
        (UNITS / name).read_text().replace("/opt/script-packages/bin", str(binary.parent))
    )
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values ("ignoring"): any output is a finding.
    assert verify.returncode == 0 and not verify.stdout.strip() and not verify.stderr.strip(), (
        verify.stdout + verify.stderr
    )
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=40", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


class NotifySocket:
    """The datagram socket systemd would listen on; `messages` are what arrived, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:  # nothing more queued right now
                return [m for _, m in self.messages]
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for m in self.drain() for line in m.splitlines()]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_core_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
    core = CoreProcess(tmp_path / "core", env=env).start()
    try:
        lines = eventually(lambda: (ls := notify_socket.lines()) and "READY=1" in ls and ls)
        assert lines[0] == "READY=1"
        assert any(line.startswith("STATUS=serving on port") for line in lines)
        # READY came after serving: the server answers, health is SERVING.
        with grpc.insecure_channel(core.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        eventually(lambda: notify_socket.lines().count("WATCHDOG=1") >= 3 or None, timeout=10)
        assert core.stop() == 0
        assert "STOPPING=1" in notify_socket.lines()
    finally:
        core.stop()


def test_agent_notifies_ready_and_stopping(
    tmp_path: Path, notify_socket: NotifySocket, satellites: list[SatelliteProcess]
) -> None:
    core = CoreProcess(tmp_path / "core").start()
    try:
        state = core.admin().install_and_wait()
        assert state.status == apb.INSTALL_STATUS_READY
        sat = SatelliteProcess(core, "sat-notify", tmp_path).register()
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = str(notify_socket.path)
        os.environ["WATCHDOG_USEC"] = "200000"
        try:
            satellites.append(sat.start())
        finally:
            os.environ.pop("WATCHDOG_USEC")
            if old is None:
                os.environ.pop("NOTIFY_SOCKET")
            else:
                os.environ["NOTIFY_SOCKET"] = old
        eventually(lambda: "READY=1" in notify_socket.lines() or None)
        eventually(lambda: notify_socket.lines().count("WATCHDOG=1") >= 2 or None, timeout=10)
        eventually(lambda: sat.current() == state.lockfile_hash, timeout=60)
        synced = f"STATUS=synced {state.lockfile_hash[:12]}"
        eventually(lambda: synced in notify_socket.lines() or None, timeout=30)
        assert sat.stop() == 0
        assert "STOPPING=1" in notify_socket.lines()
    finally:
        core.stop()


def test_notifier_speaks_to_the_abstract_namespace_and_is_silent_outside_systemd() -> None:
    name = f"spk-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"  # blocking: it is queued already
    assert not Notifier.from_environ({}).ready()
    # WATCHDOG_PID names another process: the pings are not ours to send.
    other = Notifier.from_environ(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_usec == 0


async def test_watchdog_pings_while_the_loop_runs(tmp_path: Path) -> None:
    with NotifySocketContext(tmp_path / "wd.sock") as sock:
        notifier = Notifier(str(sock.path), watchdog_usec=40_000)
        async with notifier.watchdog():  # every 20 ms; a stalled test process sees fewer
            await eventually_async(lambda: sock.lines().count("WATCHDOG=1") >= 3, timeout=10)


class NotifySocketContext(NotifySocket):
    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_health_goes_not_serving_while_the_core_drains(core: CoreProcess) -> None:
    with grpc.insecure_channel(core.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        first = next(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        assert core.proc is not None
        core.proc.send_signal(signal.SIGTERM)
        seen = []
        try:
            for reply in watch:
                seen.append(reply.status)
        except grpc.RpcError:
            pass  # the server ends the watch once it has stopped
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
        assert core.proc.wait(30) == 0
