"""A core process for the bench (`spk-core serve`, optionally with another blob CHUNK_SIZE).

    python -m scripts.benchlib.cores CHUNK serve --data-dir ...   # CHUNK 0 keeps the default

Duck-types tests.core_process.CoreProcess (data_dir, target, admin()) so the test helpers that
register and run satellites work with it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc

from scripts.benchlib.common import PYTHON, child_env
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc
from shared.proto.scriptpkgs.v1 import common_pb2 as cpb
from tests.core_process import ADMIN_TOKEN, AdminClient


class BenchCore:
    def __init__(self, data_dir: Path, chunk: int = 0, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.chunk = chunk
        self.extra = list(extra)  # more `spk-core serve` flags
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> BenchCore:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        env = dict(child_env(), SPK_ADMIN_TOKEN=ADMIN_TOKEN)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        argv = [PYTHON, "-m", "scripts.benchlib.cores", str(self.chunk), "serve"]
        argv += ["--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}"]
        argv += ["--port-file", str(port_file), "--log-level", "WARNING", *self.extra]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench core did not start; see {log.name}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def admin(self) -> AdminClient:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return AdminClient(admin_pb2_grpc.PackageAdminStub(self._channel), ADMIN_TOKEN)

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- admin shortcuts -------------------------------------------------------------------

    def configure(self, index_url: str) -> None:
        self.admin().SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=index_url))

    def add_environment(self, name: str, python: str, platform: str) -> None:
        target = cpb.TargetEnvironment(
            python_version=python, abi="cp" + python.replace(".", ""), platform=platform
        )
        self.admin().AddEnvironment(
            apb.AddEnvironmentRequest(environment=cpb.Environment(name=name, target=target))
        )

    def set_packages(self, pins: list[tuple[str, str]]) -> None:
        specs = [apb.PackageSpec(name=n, version=v) for n, v in pins]
        self.admin().SetPackages(apb.SetPackagesRequest(packages=specs))

    def install(self, timeout: float = 900.0) -> tuple[str, float]:
        """InstallNow, then follow WatchInstall to the end; (lockfile hash, seconds to ready).

        Streamed, not polled: polling every few ms is load on the core being measured.
        """
        admin = self.admin()
        start = time.perf_counter()
        admin.InstallNow(apb.InstallNowRequest())
        state = None
        for state in admin.WatchInstall(apb.WatchInstallRequest(), timeout=timeout):
            if state.status != apb.INSTALL_STATUS_INSTALLING:
                break
        elapsed = time.perf_counter() - start
        if state is None or state.status != apb.INSTALL_STATUS_READY:
            raise RuntimeError(f"install failed: {state.error if state else 'no state'}")
        return str(state.lockfile_hash), elapsed

    def create_satellite(self, name: str) -> str:
        reply = self.admin().CreateSatellite(apb.CreateSatelliteRequest(name=name))
        return str(reply.token)


def main() -> int:
    chunk = int(sys.argv[1])
    from core.api import distribution_service

    if chunk:  # read per call by the servicer, so setting it before serving is enough
        distribution_service.CHUNK_SIZE = chunk
    from core.app.cli import main as core_main

    return core_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
