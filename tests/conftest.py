"""Shared pytest fixtures. Keep each group self-contained; add new groups below."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.core_process import CoreProcess
from tests.http_servers import Handler, Scripted
from tests.index_server import PackageIndex, StaticIndex
from tests.satellite_process import SatelliteProcess
from tests.storage_servers import FreshPostgres, MotoS3

# --------------------------------------------------------------------------- package index
# A real pypiserver on 127.0.0.1 serving `wheel_dir` (build wheels into it with
# tests.wheelfactory.build_wheel, before or after the server starts).

INDEX_TOKEN = 'pypi-tok3n-"quoted"-and-\\backslash'  # awkward on purpose: netrc quoting


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    path = tmp_path / "index-packages"
    path.mkdir()
    return path


@pytest.fixture
def package_index(wheel_dir: Path) -> Iterator[PackageIndex]:
    with PackageIndex(wheel_dir) as index:
        yield index


@pytest.fixture
def auth_package_index(wheel_dir: Path) -> Iterator[PackageIndex]:
    """Every request needs basic auth `__token__` / `index.token` (htpasswd)."""
    with PackageIndex(wheel_dir, token=INDEX_TOKEN) as index:
        yield index


@pytest.fixture
def static_index(tmp_path: Path) -> Iterator[StaticIndex]:
    """Hand-written PEP 503 pages over plain files (see tests/index_server.py)."""
    with StaticIndex(tmp_path / "static") as index:
        yield index


# --------------------------------------------------------------------------- storage servers
# A fresh Postgres database per test (dropped after), and one moto S3 server per session (each
# test makes its own bucket with `s3_server.new_bucket()`). See tests/storage_servers.py.


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with FreshPostgres() as pg:
        yield pg.url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


# --------------------------------------------------------------------------- core and satellites
# A real core process per test (tmp_path/core, no registry set). A module whose tests all need
# the test index as registry overrides `core` with one that takes this `core` and `package_index`.


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    proc = CoreProcess(tmp_path / "core").start()
    yield proc
    proc.stop()


@pytest.fixture
def satellites() -> Iterator[list[SatelliteProcess]]:
    """Append every SatelliteProcess the test starts; each is stopped after the test."""
    started: list[SatelliteProcess] = []
    yield started
    for sat in started:
        sat.stop()


# --------------------------------------------------------------------------- scripted HTTP
# Loopback servers whose GET answers are plain functions (tests/http_servers.py).


@pytest.fixture
def scripted() -> Iterator[Callable[[Handler], Scripted]]:
    servers: list[Scripted] = []

    def start(answer: Handler) -> Scripted:
        servers.append(Scripted(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
