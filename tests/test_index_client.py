"""core/install/index_client.py: credentials and version listing (real loopback servers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from core.install.index_client import (
    IndexFile,
    basic_auth_header,
    package_versions,
    project_files,
    sort_versions,
    versions_from_filenames,
)
from core.state.index_config import RegistrySettings
from shared.errors import NotFound, RegistryError
from tests.http_servers import Handler, Scripted, send
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_sdist, build_wheel

# --------------------------------------------------------------------------- credentials


def test_auth_header_only_for_index_origins() -> None:
    s = RegistrySettings(index_url="https://idx.example/simple", token="t", username="u")
    assert basic_auth_header("https://idx.example/packages/a.whl", s) == "Basic dTp0"  # u:t
    assert basic_auth_header("https://IDX.example:443/x.whl", s) is not None
    assert basic_auth_header("http://idx.example/x.whl", s) is None  # never over plain http
    assert basic_auth_header("https://idx.example:8443/x.whl", s) is None
    assert basic_auth_header("https://files.example/x.whl", s) is None
    assert (
        basic_auth_header("https://idx.example/x.whl", RegistrySettings(index_url=s.index_url))
        is None
    )


# --------------------------------------------------------------------------- versions


def test_sort_versions() -> None:
    raw = ["1.0", "2.0rc1", "2.0", "banana", "1.0.0", "10.0", "2.0.post1", "1!0.1"]
    assert sort_versions(raw) == ["1!0.1", "10.0", "2.0.post1", "2.0", "2.0rc1", "1.0", "banana"]


def test_project_files_json_and_html() -> None:
    files = [
        {"filename": "c-1.0.tar.gz", "hashes": {"sha256": "AB"}, "url": "../f/c-1.0.tar.gz"},
        {"filename": "c-1.1.tar.gz", "hashes": {}},
    ]
    doc = {"meta": {"api-version": "1.1"}, "name": "c", "files": files}
    page = "https://idx.example/simple/c/"
    assert project_files(json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json", page) == [
        IndexFile("c-1.0.tar.gz", "ab", "https://idx.example/simple/f/c-1.0.tar.gz"),
        IndexFile("c-1.1.tar.gz", None, ""),
    ]
    html = (
        b'<a href="../../p/c-2.0-py3-none-any.whl#sha256=ab">c-2.0-py3-none-any.whl</a>'
        b'<a href="/p/c-2.1-py3-none-any.whl#md5=cd">c-2.1</a>'
    )
    assert project_files(html, "text/html; charset=utf-8", page) == [
        IndexFile(
            "c-2.0-py3-none-any.whl", "ab", "https://idx.example/p/c-2.0-py3-none-any.whl#sha256=ab"
        ),
        IndexFile(
            "c-2.1-py3-none-any.whl", None, "https://idx.example/p/c-2.1-py3-none-any.whl#md5=cd"
        ),
    ]


def test_versions_from_filenames_skip_other_projects() -> None:
    names = [
        "my_pkg-1.0-py3-none-any.whl",
        "my-pkg-1.1.tar.gz",
        "my_pkg-2.0b1-cp311-cp311-win_amd64.whl",
        "my_pkg_extra-9.0-py3-none-any.whl",  # a different project
        "my-pkg-weird_version.tar.gz",  # not PEP 440: kept, sorted last
    ]
    assert versions_from_filenames("my-pkg", names) == ["2.0b1", "1.1", "1.0", "weird_version"]


async def test_package_versions_from_a_pep503_index(
    package_index: PackageIndex, wheel_dir: Path
) -> None:
    for version in ("3.0", "3.1rc1", "3.1", "2.0"):
        build_wheel(WheelSpec("c", version), wheel_dir)
    build_sdist("c", "1.5", wheel_dir)
    settings = RegistrySettings(index_url=package_index.url)
    assert await package_versions("C", settings) == ["3.1", "3.1rc1", "3.0", "2.0", "1.5"]
    with pytest.raises(NotFound, match="package 'nosuch' was not found"):
        await package_versions("nosuch", settings)


async def test_package_versions_prefers_pep691_json(
    scripted: Callable[[Handler], Scripted],
) -> None:
    doc = {"files": [{"filename": "c-1.0-py3-none-any.whl"}, {"filename": "c-1.1.tar.gz"}]}
    body = json.dumps(doc).encode()
    index = scripted(
        lambda h: send(h, 200, body, Content_Type="application/vnd.pypi.simple.v1+json")
    )
    versions = await package_versions("c", RegistrySettings(index_url=f"{index.url}/simple"))
    assert versions == ["1.1", "1.0"]
    path, headers = index.requests[0]
    assert path == "/simple/c/"
    assert headers["Accept"].startswith("application/vnd.pypi.simple.v1+json")


async def test_package_versions_errors(auth_package_index: PackageIndex, wheel_dir: Path) -> None:
    build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    token = auth_package_index.token
    assert token
    with pytest.raises(RegistryError, match=r"rejected the credentials \(HTTP 401\)") as err:
        await package_versions("c", RegistrySettings(index_url=auth_package_index.url))
    assert token not in str(err.value)
    ok = RegistrySettings(index_url=auth_package_index.url, token=token)
    assert await package_versions("c", ok) == ["3.0"]
    with pytest.raises(RegistryError, match="unreachable"):
        await package_versions("c", RegistrySettings(index_url="http://127.0.0.1:9/simple"))
