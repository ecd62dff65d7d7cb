"""Run a real satellite agent (`spk-satellite agent`) as a process, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess


def export_signing_key(core: CoreProcess, dest: Path) -> Path:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.app.cli",
            "signing-key",
            "export",
            "--data-dir",
            str(core.data_dir),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    dest.write_text(out.stdout)
    return dest


class SatelliteProcess:
    def __init__(self, core: CoreProcess, name: str, root: Path, *extra: str) -> None:
        self.core = core
        self.name = name
        self.data_dir = root / name
        self.token_file = root / f"{name}.token"
        self.key_file = root / "core-key.pem"
        self.log_path = root / f"{name}.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.target = core.target
        self.module = "satellite.cli"  # fault tests swap in a wrapper (tests/stress)
        self.wrapper: list[str] = []  # a command prefix, e.g. strace (tests/stress)
        # The interpreter the agent (and its script runs) use: another CPython for mixed fleets.
        self.python = sys.executable

    def register(self) -> SatelliteProcess:
        reply = self.core.admin().CreateSatellite(apb.CreateSatelliteRequest(name=self.name))
        self.token_file.write_text(reply.token)
        if not self.key_file.exists():
            export_signing_key(self.core, self.key_file)
        return self

    def start(self) -> SatelliteProcess:
        env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                self.python,
                "-m",
                self.module,
                "agent",
                "--core",
                self.target,
                "--token-file",
                str(self.token_file),
                "--signing-key",
                str(self.key_file),
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "DEBUG",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, object]:
        out = subprocess.run(
            [
                self.python,
                "-m",
                "satellite.cli",
                "status",
                "--data-dir",
                str(self.data_dir),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def current(self) -> str | None:
        link = self.data_dir / "current"
        try:
            return Path(os.readlink(link)).name
        except OSError:
            return None

    def run(self, script: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                self.python,
                "-m",
                "satellite.cli",
                "run",
                "--data-dir",
                str(self.data_dir),
                str(script),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            **kw,
        )

    def fleet_row(self) -> apb.Satellite:
        sats: list[apb.Satellite] = list(self.core.admin().ListSatellites().satellites)
        return next(s for s in sats if s.name == self.name)
