"""core/install/fetch.py: each wheel downloaded once, checked against what the index published."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from core.install.fetch import Fetcher
from core.install.pylock import LockedWheel
from core.state.index_config import RegistrySettings
from shared.errors import IntegrityError, RegistryError, ResolveError
from tests.http_servers import Handler, Scripted, send
from tests.index_server import PackageIndex
from tests.wheelfactory import WheelSpec, build_wheel


def locked(
    wheel: Path, url: str, sha256: str | None = None, size: int | None = None
) -> LockedWheel:
    digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    return LockedWheel("c", "3.0", wheel.name, url, digest, size, True)


def test_the_index_file_is_downloaded_and_checked(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    url = f"{package_index.base_url}/packages/{wheel.name}"
    with Fetcher(RegistrySettings(index_url=package_index.url), tmp_path) as fetcher:
        got = fetcher.fetch(locked(wheel, url, size=wheel.stat().st_size))
        again = fetcher.fetch(locked(wheel, url))  # the same name twice gets its own file
    assert got.path.read_bytes() == wheel.read_bytes() and got.size == wheel.stat().st_size
    assert again.path != got.path and again.path.read_bytes() == wheel.read_bytes()


def test_bytes_other_than_the_published_ones_are_refused(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    # The page promises one sha256, the file server delivers other bytes (a tampered mirror).
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    url = f"{package_index.base_url}/packages/{wheel.name}"
    with Fetcher(RegistrySettings(index_url=package_index.url), tmp_path / "d") as fetcher:
        (tmp_path / "d").mkdir()
        with pytest.raises(IntegrityError) as err:
            fetcher.fetch(locked(wheel, url, sha256="ab" * 32))
        with pytest.raises(IntegrityError, match="longer than the 10 bytes"):
            fetcher.fetch(locked(wheel, url, size=10))
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert str(err.value) == (
        f"'c' 3.0: {wheel.name} has sha256 {actual}, which is not the one the index publishes"
        f" for it ({'ab' * 32}); refusing it"
    )
    assert list((tmp_path / "d").iterdir()) == []  # nothing refused is left behind


def test_credentials_on_an_auth_index(
    auth_package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    token = auth_package_index.token
    assert token
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    item = locked(wheel, f"{auth_package_index.base_url}/packages/{wheel.name}")
    good = RegistrySettings(index_url=auth_package_index.url, token=token)
    with Fetcher(good, tmp_path) as fetcher:
        assert fetcher.fetch(item).path.read_bytes() == wheel.read_bytes()
    for settings in (
        RegistrySettings(index_url=auth_package_index.url),
        RegistrySettings(index_url=auth_package_index.url, token="nope-" + token),
    ):
        with Fetcher(settings, tmp_path) as fetcher, pytest.raises(RegistryError) as err:
            fetcher.fetch(item)
        assert "rejected the credentials (HTTP 40" in str(err.value)
        assert token not in str(err.value)


def test_credentials_never_follow_a_redirect_to_another_host(
    scripted: Callable[[Handler], Scripted], wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    data = wheel.read_bytes()
    files = scripted(lambda h: send(h, 200, data, Content_Type="application/octet-stream"))
    index = scripted(lambda h: send(h, 302, Location=f"{files.url}/f/{wheel.name}?X-Sig=secret"))
    settings = RegistrySettings(index_url=f"{index.url}/simple/", token="tok-SECRET")
    with Fetcher(settings, tmp_path) as fetcher:
        got = fetcher.fetch(locked(wheel, f"{index.url}/packages/{wheel.name}"))
    assert got.path.read_bytes() == data
    assert "Authorization" in index.requests[0][1]
    assert "Authorization" not in files.requests[0][1]


def test_a_listed_file_the_index_cannot_serve(
    scripted: Callable[[Handler], Scripted], wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(WheelSpec("c", "3.0"), wheel_dir)
    gone = scripted(lambda h: send(h, 404))
    with Fetcher(RegistrySettings(index_url=f"{gone.url}/simple/"), tmp_path) as fetcher:
        with pytest.raises(ResolveError, match="listed by the index but not served"):
            fetcher.fetch(locked(wheel, f"{gone.url}/packages/{wheel.name}"))
        with pytest.raises(RegistryError, match="only http"):
            fetcher.fetch(locked(wheel, f"file:///etc/{wheel.name}"))
