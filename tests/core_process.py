"""Run the real core (`spk-core serve`) as a process on a loopback port, for tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc

ADMIN_TOKEN = "spk_admin_test-manage-token-0123456789"
T = TypeVar("T")


def eventually(
    check: Callable[[], T | Literal[False] | None], timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll until `check` returns a truthy value (or stops raising AssertionError); that value.

    `check` may say "not yet" with None or False (`lambda: cond and row`), so the result is
    typed as what it returns once it is ready.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        time.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError(f"condition not met within {timeout}s")


async def eventually_async(
    check: Callable[[], T | Literal[False] | None], timeout: float = 30.0, interval: float = 0.01
) -> T:
    """`eventually` for async tests: polls without blocking the event loop it waits on."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        await asyncio.sleep(interval)
    if last is not None:
        raise last
    raise AssertionError(f"condition not met within {timeout}s")


class CoreProcess:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        port: int = 0,
        admin_token: str = ADMIN_TOKEN,
    ) -> None:
        self.admin_token = admin_token
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.extra_env = env or {}
        self.requested_port = port
        self.port = 0
        self.extra_args: list[str] = []
        self.wrapper: list[str] = []  # a command prefix, e.g. strace (tests/stress)
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def start(self, timeout: float = 30.0) -> CoreProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update({"SPK_ADMIN_TOKEN": self.admin_token, "GRPC_ENABLE_FORK_SUPPORT": "false"})
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "core.app.cli",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.requested_port}",
                "--port-file",
                str(port_file),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"core exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"core did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.requested_port = self.port  # a restart binds the same port
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self, token: str | None = None) -> AdminClient:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        stub = admin_pb2_grpc.PackageAdminStub(self._channel)
        return AdminClient(stub, self.admin_token if token is None else token)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class AdminClient:
    """Calls PackageAdmin with the bearer token and a deadline."""

    def __init__(self, stub: admin_pb2_grpc.PackageAdminStub, token: str) -> None:
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        rpc = getattr(self.stub, method)

        def call(request: Any = None, timeout: float = 30.0) -> Any:
            if request is None:
                request = getattr(apb, f"{method}Request")()
            return rpc(request, metadata=self.metadata, timeout=timeout)

        return call

    def install_pins(self, *pins: tuple[str, str]) -> str:
        """Set the allowlist to these (name, version) pins, install, insist on READY; the hash."""
        self.SetPackages(
            apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
        )
        state = self.install_and_wait()
        assert state.status == apb.INSTALL_STATUS_READY, state.error
        return str(state.lockfile_hash)

    def install_and_wait(self, timeout: float = 120.0) -> apb.InstallState:
        self.InstallNow(apb.InstallNowRequest())
        state: apb.InstallState = eventually(
            lambda: (s := self.GetInstallState()).status != apb.INSTALL_STATUS_INSTALLING and s,
            timeout=timeout,
            interval=0.2,
        )
        return state
