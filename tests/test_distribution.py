"""PackageDistribution on the real core: manifests by hash, resumable blobs, per-client caps."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from core.api.distribution_service import CHUNK_SIZE
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import distribution_pb2 as dpb
from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def _stub(
    core: CoreProcess,
) -> tuple[
    grpc.Channel, distribution_pb2_grpc.PackageDistributionStub, tuple[tuple[str, str], ...]
]:
    token = core.admin().CreateSatellite(apb.CreateSatelliteRequest(name="probe")).token
    channel = grpc.insecure_channel(core.target)
    return (
        channel,
        distribution_pb2_grpc.PackageDistributionStub(channel),
        (("authorization", f"Bearer {token}"),),
    )


def test_manifest_history_blobs_and_resume(
    core: CoreProcess, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheel = build_wheel(
        WheelSpec("big", "1.0", files={"big/x.bin": os.urandom(3 * 2**20 + 17)}), wheel_dir
    )
    build_wheel(WheelSpec("small", "1.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="small", version="1.0")])
    )
    first = admin.install_and_wait().lockfile_hash
    admin.SetPackages(apb.SetPackagesRequest(packages=[apb.PackageSpec(name="big", version="1.0")]))
    second = admin.install_and_wait().lockfile_hash
    channel, stub, md = _stub(core)
    with channel:
        # History is served; an unknown hash is NOT_FOUND, never an empty manifest.
        old = stub.GetManifest(dpb.GetManifestRequest(lockfile_hash=first), metadata=md, timeout=10)
        assert old.lockfile_hash == first and old.entries[0].name == "small"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetManifest(
                dpb.GetManifestRequest(lockfile_hash="f" * 64), metadata=md, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.GetManifest(
                dpb.GetManifestRequest(lockfile_hash="../etc"), metadata=md, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        entry = stub.GetManifest(
            dpb.GetManifestRequest(lockfile_hash=second), metadata=md, timeout=10
        ).entries[0]
        chunks = list(
            stub.DownloadBlob(dpb.DownloadBlobRequest(sha256=entry.sha256), metadata=md, timeout=30)
        )
        expected_chunks = -(-entry.size // CHUNK_SIZE)  # the core's chunk size, measured
        assert all(len(c.data) <= 2**20 for c in chunks) and len(chunks) == expected_chunks
        data = b"".join(c.data for c in chunks)
        assert (
            hashlib.sha256(data).hexdigest()
            == entry.sha256
            == hashlib.sha256(wheel.read_bytes()).hexdigest()
        )
        offset = 2**20 + 5
        tail = stub.DownloadBlob(
            dpb.DownloadBlobRequest(sha256=entry.sha256, offset=offset), metadata=md, timeout=30
        )
        tail_chunks = list(tail)
        assert tail_chunks[0].offset == offset
        assert b"".join(c.data for c in tail_chunks) == data[offset:]
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.DownloadBlob(dpb.DownloadBlobRequest(sha256="0" * 64), metadata=md, timeout=10)
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_refresh_sends_desired_at_once_and_caps_streams(core: CoreProcess) -> None:
    desired = core.admin().install_and_wait().lockfile_hash
    channel, stub, md = _stub(core)
    with channel:
        streams = [
            stub.RefreshScriptPackages(dpb.SubscribeRequest(), metadata=md) for _ in range(4)
        ]
        for call in streams:
            assert next(call).lockfile_hash == desired
        fifth = stub.RefreshScriptPackages(dpb.SubscribeRequest(), metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            next(fifth)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        streams[0].cancel()  # a slot frees up once the core sees the cancellation

        def reopened() -> bool:
            try:
                call = stub.RefreshScriptPackages(dpb.SubscribeRequest(), metadata=md)
                streams.append(call)
                return bool(next(call).lockfile_hash == desired)
            except grpc.RpcError:
                return False

        assert eventually(reopened, timeout=10)
        for call in streams[1:]:
            call.cancel()


def test_satellite_token_cannot_call_admin_and_admin_token_cannot_subscribe(
    core: CoreProcess,
) -> None:
    channel, stub, md = _stub(core)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            core.admin(token=md[0][1].split()[1]).ListPackages()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        admin_md = core.admin().metadata
        with pytest.raises(grpc.RpcError) as err:
            next(stub.RefreshScriptPackages(dpb.SubscribeRequest(), metadata=admin_md))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
