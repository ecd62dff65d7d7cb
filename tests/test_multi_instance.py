"""Two core instances sharing Postgres: a change on one reaches the other's satellites at once
(LISTEN/NOTIFY), not only at its next poll; both serve the same history and signing key."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import distribution_pb2 as dpb
from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc
from tests.core_process import CoreProcess
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def test_change_on_one_instance_reaches_the_other_at_once(
    tmp_path: Path, postgres_url: str, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    env = {
        "SPK_DATABASE_URL": postgres_url,
        "SPK_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    a = CoreProcess(tmp_path / "a", env=env)
    b = CoreProcess(tmp_path / "b", env=env)
    # B polls only every 60 s: a fast hand-over can only come from NOTIFY.
    a.extra_args = b.extra_args = ["--desired-poll-seconds", "60"]
    a.start()
    b.start()
    try:
        admin_a = a.admin()
        admin_a.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        first = admin_a.install_and_wait().lockfile_hash
        token = admin_a.CreateSatellite(apb.CreateSatelliteRequest(name="sat")).token
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(b.target) as channel:
            stub = distribution_pb2_grpc.PackageDistributionStub(channel)
            stream = stub.RefreshScriptPackages(dpb.SubscribeRequest(), metadata=md, timeout=60)
            assert next(stream).lockfile_hash == first
            admin_a.SetPackages(
                apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="1.0")])
            )
            second = admin_a.install_and_wait().lockfile_hash
            started = time.monotonic()
            assert next(stream).lockfile_hash == second
            assert time.monotonic() - started < 10
            stream.cancel()
            # B serves A's manifest, signed with the shared key.
            manifest = stub.GetManifest(
                dpb.GetManifestRequest(lockfile_hash=second), metadata=md, timeout=10
            )
            assert manifest.signature and manifest.entries[0].name == "alpha"
        # The install state lives in the shared database: B reports what A did.
        admin_b = b.admin()
        assert admin_b.GetInstallState().lockfile_hash == second
    finally:
        a.stop()
        b.stop()
