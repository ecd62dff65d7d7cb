"""Scale-out as an operator runs it (issue 13): core instances behind a real nginx (the config in
contrib/nginx/), sharing Postgres and an S3-compatible store (moto), satellites and admins
talking only to nginx; an instance killed mid-stream; blob bytes from the object store
(presigned) or a CDN (nginx serving the blob store), verified and falling back to the core.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.state.keys import SECRET_KEY_ENV
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc
from tests.core_process import ADMIN_TOKEN, AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.nginx_process import Nginx
from tests.prometheus_server import metrics_url, scrape
from tests.satellite_process import SatelliteProcess
from tests.storage_servers import MotoS3
from tests.tcp_proxy import TcpProxy
from tests.wheelfactory import WheelSpec, build_wheel

RETRY = ["--retry-base", "0.2", "--retry-cap", "1", "--no-drift-watch"]


@dataclass
class Deployment:
    """Core instances on one Postgres and one bucket, behind one nginx."""

    cores: list[CoreProcess]
    lb: Nginx
    root: Path
    satellites: list[SatelliteProcess] = field(default_factory=list)
    _channel: grpc.Channel | None = None

    def admin(self) -> AdminClient:
        """The admin API through nginx, as an operator reaches it."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.lb.grpc_target)
        return AdminClient(admin_pb2_grpc.PackageAdminStub(self._channel), ADMIN_TOKEN)

    def satellite(self, name: str, target: str | None = None) -> SatelliteProcess:
        sat = SatelliteProcess(self.cores[0], name, self.root, *RETRY).register()
        sat.target = target or self.lb.grpc_target
        self.satellites.append(sat)
        return sat.start()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for sat in self.satellites:
            sat.stop()
        for core in self.cores:
            core.stop()
        self.lb.stop()


@pytest.fixture
def shared_env(
    postgres_url: str, s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    env = {
        "SPK_DATABASE_URL": postgres_url,
        SECRET_KEY_ENV: base64.b64encode(os.urandom(32)).decode(),
        **s3_server.env(s3_server.new_bucket()),
    }
    for key, value in env.items():  # the key export and the CLI read them too
        monkeypatch.setenv(key, value)
    return env


def _deploy(tmp_path: Path, env: dict[str, str], count: int = 2, *extra: str) -> Deployment:
    cores = []
    for i in range(count):
        core = CoreProcess(tmp_path / f"core-{i}", env=env)
        core.extra_args = ["--desired-poll-seconds", "1", *extra]
        cores.append(core.start())
    lb = Nginx(tmp_path, lb_upstreams=[c.target for c in cores]).start()
    return Deployment(cores, lb, tmp_path)


@pytest.fixture
def deployment(tmp_path: Path, shared_env: dict[str, str]) -> Iterator[Deployment]:
    d = _deploy(tmp_path, shared_env)
    yield d
    d.close()


def _install(admin: AdminClient, index: PackageIndex, *pins: tuple[str, str]) -> str:
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=index.url, timeout_seconds=10))
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def _converged(sat: SatelliteProcess, wanted: str, timeout: float = 60) -> None:
    eventually(lambda: sat.current() == wanted, timeout=timeout)


def _served(core: CoreProcess) -> int:
    return core.log().count("subscribed")


def test_an_install_reaches_every_satellite_whichever_instance_it_landed_on(
    deployment: Deployment, package_index: PackageIndex, wheel_dir: Path
) -> None:
    for name in ("alpha", "beta"):
        build_wheel(WheelSpec(name, "1.0", files={f"{name}/d.bin": os.urandom(50_000)}), wheel_dir)
    admin = deployment.admin()
    assert admin.GetStorageBackend().name == "s3"  # shared by default, never the local disk
    first = _install(admin, package_index, ("alpha", "1.0"))
    sats = [deployment.satellite(f"sat-{i}") for i in range(6)]
    for sat in sats:
        _converged(sat, first)
    assert all(_served(core) for core in deployment.cores), "nginx sent everyone to one instance"
    # Whichever instance an admin reaches, it sees every agent connected (stream leases), and
    # one that stops as offline at once.
    names = {s.name for s in sats}

    def everywhere(wanted: set[str]) -> bool:
        return all(
            {s.name for s in core.admin().ListSatellites().satellites if s.connected} == wanted
            for core in deployment.cores
        )

    eventually(lambda: everywhere(names), timeout=30)
    sats[0].stop()
    eventually(lambda: everywhere(names - {sats[0].name}), timeout=30)
    sats[0].start()
    # A second release, installed by whichever instance nginx picks, reaches all of them.
    second = _install(admin, package_index, ("alpha", "1.0"), ("beta", "1.0"))
    for sat in sats:
        _converged(sat, second)

    # Each agent reports READY after its flip; the report may land a moment after `current`.
    def ready() -> set[str]:
        return {s.name for s in admin.ListSatellites().satellites if s.status == "ready"}

    eventually(lambda: ready() == {s.name for s in sats}, timeout=30)
    # The admin CLI works through nginx too.
    cli = subprocess.run(
        [sys.executable, "-m", "core.app.cli", "admin", "--core", deployment.lb.grpc_target,
         "state"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, SPK_ADMIN_TOKEN=ADMIN_TOKEN),
    )  # fmt: skip
    assert cli.returncode == 0 and second in cli.stdout, cli.stderr


def test_an_instance_killed_mid_stream_loses_no_satellite_and_resends_little(
    deployment: Deployment, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(7)
    build_wheel(WheelSpec("big", "1.0", files={"big/d.bin": rng.randbytes(12 << 20)}), wheel_dir)
    admin = deployment.admin()
    wanted = _install(admin, package_index, ("big", "1.0"))
    blob_size = admin.GetManifest(apb.AdminGetManifestRequest()).total_size
    # Satellites -> a throttled link -> nginx -> the cores: the pulls take a few seconds.
    link = TcpProxy(deployment.lb.grpc_port, rate=2 << 20)
    sats = [deployment.satellite(f"sat-k{i}", target=link.target) for i in range(4)]

    def pulling() -> bool:
        partials = [p for s in sats for p in (s.data_dir / "blobs" / ".partial").glob("*")]
        return sum(1 for p in partials if p.stat().st_size > 1 << 20) >= 2

    eventually(pulling, timeout=60, interval=0.05)
    victim = max(deployment.cores, key=_served)  # the one holding most refresh streams
    victim.kill()
    for sat in sats:
        _converged(sat, wanted, timeout=120)
    resent = link.bytes_down - len(sats) * blob_size
    print(f"re-sent {resent} of {len(sats) * blob_size} bytes")
    assert resent < 0.05 * len(sats) * blob_size, (resent, link.bytes_down)
    assert any("refresh stream lost" in s.log() for s in sats)  # the kill hit live streams
    survivor = next(c for c in deployment.cores if c is not victim)
    assert _served(survivor) >= len(sats)  # every refresh stream now runs on the survivor
    link.close()


def test_an_install_on_a_killed_instance_does_not_wedge_the_installer_lock(
    deployment: Deployment, package_index: PackageIndex, wheel_dir: Path
) -> None:
    rng = random.Random(9)
    build_wheel(WheelSpec("slow", "1.0", files={"slow/d.bin": rng.randbytes(8 << 20)}), wheel_dir)
    build_wheel(WheelSpec("quick", "1.0"), wheel_dir)
    # Instance 0 installs from a slow link to the index; it dies in the middle.
    slow_index = TcpProxy(package_index.port, rate=1 << 20)
    a = deployment.cores[0]
    admin_a = a.admin()
    admin_a.SetRegistryConfig(
        apb.SetRegistryConfigRequest(
            index_url=f"http://{slow_index.target}/simple/", timeout_seconds=30
        )
    )
    admin_a.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="slow", version="1.0")])
    )
    admin_a.InstallNow(apb.InstallNowRequest())
    eventually(lambda: admin_a.GetInstallState().phase == "fetching", timeout=30, interval=0.05)
    a.kill()
    slow_index.close()
    # The survivor can install at once: Postgres ended the dead instance's session, and its
    # advisory lock with it.
    admin = deployment.admin()
    wanted = _install(admin, package_index, ("quick", "1.0"))
    assert admin.GetInstallState().lockfile_hash == wanted


def test_blob_bytes_come_from_the_object_store_with_presigned_urls(
    tmp_path: Path, shared_env: dict[str, str], package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("gamma", "1.0", files={"gamma/d.bin": os.urandom(300_000)}), wheel_dir)
    build_wheel(WheelSpec("delta", "1.0"), wheel_dir)
    d = _deploy(tmp_path, shared_env, 2, "--presign-blob-urls", "--presign-ttl-seconds", "120")
    try:
        wanted = _install(d.admin(), package_index, ("gamma", "1.0"), ("delta", "1.0"))
        sat = d.satellite("sat-s3")
        _converged(sat, wanted)
        # The result is logged a moment after `current` flips.
        eventually(lambda: "2 from URLs" in sat.log(), timeout=10)
        log = sat.log()
        for text in (log, *(c.log() for c in d.cores)):
            assert "X-Amz-Signature" not in text and "Signature=" not in text
    finally:
        d.close()


def _metric(url: str, name: str) -> float:
    """The sum of `name`'s samples in one scrape of `url`."""
    text = scrape(url)
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


def test_blob_bytes_come_from_a_cdn_and_fall_back_to_the_core_when_it_is_gone(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path, satellites: list[SatelliteProcess]
) -> None:
    build_wheel(WheelSpec("eps", "1.0", files={"eps/d.bin": os.urandom(200_000)}), wheel_dir)
    build_wheel(WheelSpec("zeta", "1.0"), wheel_dir)
    core = CoreProcess(tmp_path / "core")
    cdn = Nginx(tmp_path, blobs_root=core.data_dir)
    core.extra_args = ["--blob-base-url", cdn.blob_base_url, "--metrics-listen", "127.0.0.1:0"]
    core.start()
    cdn.start()
    try:
        admin = core.admin()
        first = _install(admin, package_index, ("eps", "1.0"))
        metrics = ("--metrics-listen", "127.0.0.1:0")
        sat = SatelliteProcess(core, "sat-cdn", tmp_path, *RETRY, *metrics).register()
        satellites.append(sat.start())
        _converged(sat, first)
        gets = [line for line in cdn.access_log().splitlines() if ".whl" in line]
        assert gets and all(" 200 " in line or " 206 " in line for line in gets), gets
        assert all('"auth=-"' in line for line in gets)  # the satellite token stays home
        eventually(lambda: "1 from URLs" in sat.log(), timeout=10)  # logged after the flip
        core_url, sat_url = metrics_url(core.log()), metrics_url(sat.log())
        assert core_url and sat_url
        assert _metric(core_url, "spk_blob_locations_issued_total") == 1
        # Counted once the agent has the result, a moment after its report.
        eventually(lambda: _metric(sat_url, "spk_satellite_blobs_by_url_total") == 1)
        assert _metric(sat_url, "spk_satellite_url_fallbacks_total") == 0
        cdn.stop()  # the CDN is gone: the next release comes through the core
        second = _install(admin, package_index, ("eps", "1.0"), ("zeta", "1.0"))
        _converged(sat, second)
        assert "falling back to the core" in sat.log()
        assert _metric(core_url, "spk_blob_locations_issued_total") == 2
        eventually(lambda: _metric(sat_url, "spk_satellite_url_fallbacks_total") == 1)
        assert _metric(sat_url, "spk_satellite_blobs_by_url_total") == 1
    finally:
        cdn.stop()
        core.stop()
