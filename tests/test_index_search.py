"""SearchPackages and GetPackageVersions: pure ranking/parsing, and the real core on pypiserver."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from core.install.index_search import project_names, rank
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.conftest import INDEX_TOKEN
from tests.core_process import CoreProcess
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_sdist, build_wheel


def test_rank_exact_then_prefix_then_substring() -> None:
    names = ["xrequests", "requests-oauth", "Requests", "requests_toolbelt", "other"]
    assert rank(names, "requests", 10) == [
        "Requests", "requests-oauth", "requests_toolbelt", "xrequests",
    ]  # fmt: skip
    assert rank(names, "requests", 2) == ["Requests", "requests-oauth"]


def test_project_names_from_json_and_html() -> None:
    doc = b'{"meta": {}, "projects": [{"name": "a"}, {"name": "B"}]}'
    assert project_names(doc, "application/vnd.pypi.simple.v1+json") == ["a", "B"]
    html = b'<html><body><a href="/simple/a/">a</a>\n<a href="/simple/b/">B</a></body></html>'
    assert project_names(html, "text/html") == ["a", "B"]


def test_search_and_versions_through_the_core(
    core: CoreProcess, auth_package_index: PackageIndex, wheel_dir: Path
) -> None:
    for version in ("1.0", "2.0rc1", "2.0", "1.10"):
        build_wheel(WheelSpec("alpha", version), wheel_dir)
    build_sdist("alpha", "0.9", wheel_dir)
    build_wheel(WheelSpec("alphabet", "1.0"), wheel_dir)
    build_wheel(WheelSpec("beta", "1.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(
        apb.SetRegistryConfigRequest(index_url=auth_package_index.url, auth_token=INDEX_TOKEN)
    )
    found = admin.SearchPackages(apb.SearchPackagesRequest(query="alpha"))
    assert list(found.names) == ["alpha", "alphabet"]
    versions = admin.GetPackageVersions(apb.GetPackageVersionsRequest(name="Alpha"))
    assert versions.name == "alpha"
    assert list(versions.versions) == ["2.0", "2.0rc1", "1.10", "1.0", "0.9"]
    with pytest.raises(grpc.RpcError) as err:
        admin.GetPackageVersions(apb.GetPackageVersionsRequest(name="nosuch"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.SearchPackages(apb.SearchPackagesRequest(query=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(auth_token="wrong"))
    with pytest.raises(grpc.RpcError) as err:
        admin.GetPackageVersions(apb.GetPackageVersionsRequest(name="beta"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "credentials" in (err.value.details() or "")
    assert INDEX_TOKEN not in core.log() and "wrong" not in (err.value.details() or "")
