"""Blob store backends (filesystem, database on SQLite and Postgres, S3 on moto) and the registry.

The same contract runs against every backend; then what is particular to each: chunked database
reads, S3 configuration from the environment, registry fallback, and the real core serving a blob
from S3 while its credentials stay out of logs and files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import peewee as pw
import pytest

from core.state.db import BlobChunk, database_proxy, open_database
from core.storage.backends import StoreRegistry, build_registry
from core.storage.blobstore import BlobStore, FilesystemBlobStore
from core.storage.database_store import DatabaseBlobStore
from core.storage.s3_store import S3BlobStore, S3Config, s3_config_from_env
from shared.errors import IntegrityError, InvalidArgument, NotFound, StoreError
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import distribution_pb2 as dpb
from shared.proto.scriptpkgs.v1 import distribution_pb2_grpc
from tests.core_process import CoreProcess
from tests.index_server import PackageIndex
from tests.storage_servers import S3_SECRET, FreshPostgres, MotoS3
from tests.wheelfactory import WheelSpec, build_wheel

SMALL_CHUNK = 4096  # database chunk size in these tests: several chunks per blob


def make_blob(tmp_path: Path, data: bytes) -> tuple[str, Path]:
    path = tmp_path / f"src-{hashlib.sha256(data).hexdigest()[:8]}.whl"
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[pw.Database]:
    db = open_database(tmp_path)
    yield db
    db.close()


@pytest.fixture(params=["filesystem", "database-sqlite", "database-postgres", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, s3_server: MotoS3) -> Iterator[BlobStore]:
    kind = request.param
    if kind == "filesystem":
        yield FilesystemBlobStore(tmp_path / "blobs")
    elif kind == "database-sqlite":
        db = open_database(tmp_path)
        yield DatabaseBlobStore(chunk_size=SMALL_CHUNK)
        db.close()
    elif kind == "database-postgres":
        with FreshPostgres() as pg:
            db = open_database(tmp_path, pg.url)
            yield DatabaseBlobStore(chunk_size=SMALL_CHUNK)
            db.close()
    else:
        config, _ = s3_config_from_env(s3_server.env(s3_server.new_bucket()))
        assert config is not None
        yield S3BlobStore(config)


def test_contract_put_read_resume_delete(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3 * SMALL_CHUNK + 123)
    sha, src = make_blob(tmp_path, data)
    assert not store.has(sha) and store.size(sha) is None
    with pytest.raises(NotFound):
        store.open_read(sha)
    assert store.put_file(sha, src) is True
    assert store.put_file(sha, src) is False  # idempotent
    assert store.has(sha) and store.size(sha) == len(data)
    with store.open_read(sha) as f:
        assert f.read() == data
    local = store.local_path(sha)  # only the filesystem backend keeps blobs as files
    if store.name == "filesystem":
        assert local is not None and local.read_bytes() == data
    else:
        assert local is None
    for offset in (1, SMALL_CHUNK - 1, SMALL_CHUNK, 2 * SMALL_CHUNK + 7, len(data)):
        with store.open_read(sha, offset) as f:  # resumable from any offset, chunk edges too
            assert f.read() == data[offset:]
    with pytest.raises(InvalidArgument):
        store.open_read(sha, len(data) + 1)
    other_sha, other = make_blob(tmp_path, b"another wheel")
    store.put_file(other_sha, other)
    assert sorted(store.list()) == sorted([sha, other_sha])
    assert store.delete(sha) is True
    assert store.delete(sha) is False
    assert not store.has(sha) and list(store.list()) == [other_sha]


def test_contract_content_must_match_its_address(store: BlobStore, tmp_path: Path) -> None:
    sha, _ = make_blob(tmp_path, b"the real bytes")
    _, liar = make_blob(tmp_path, b"different bytes")
    with pytest.raises(IntegrityError):
        store.put_file(sha, liar)
    assert not store.has(sha) and list(store.list()) == []


def test_database_store_streams_chunk_by_chunk(sqlite_db: pw.Database, tmp_path: Path) -> None:
    store = DatabaseBlobStore(chunk_size=SMALL_CHUNK)
    data = os.urandom(5 * SMALL_CHUNK + 1)
    sha, src = make_blob(tmp_path, data)
    store.put_file(sha, src)
    assert BlobChunk.select().where(BlobChunk.sha256 == sha).count() == 6
    with store.open_read(sha) as f:
        pieces = iter(lambda: f.read(SMALL_CHUNK), b"")
        assert [len(p) for p in pieces] == [SMALL_CHUNK] * 5 + [1]
    # Deleted mid-stream (GC or a migration's delete_source): an error, never wrong bytes.
    reader = store.open_read(sha)
    assert reader.read(SMALL_CHUNK) == data[:SMALL_CHUNK]
    store.delete(sha)
    with pytest.raises(StoreError, match="mid-read"):
        reader.read(SMALL_CHUNK)


def test_s3_config_from_env() -> None:
    assert s3_config_from_env({}) == (None, None)
    config, problem = s3_config_from_env(
        {"SPK_S3_BUCKET": "b", "SPK_S3_REGION": "eu-west-1", "SPK_S3_ACCESS_KEY_ID": "id"}
    )
    assert config is None and problem == "SPK_S3_SECRET_ACCESS_KEY is not set"
    _, problem = s3_config_from_env({"SPK_S3_ENDPOINT": "http://127.0.0.1:9000"})
    assert problem is not None
    assert all(f"SPK_S3_{v}" in problem for v in ("BUCKET", "REGION", "ACCESS_KEY_ID"))
    full = {
        "SPK_S3_BUCKET": "b",
        "SPK_S3_REGION": "r",
        "SPK_S3_ACCESS_KEY_ID": "id",
        "SPK_S3_SECRET_ACCESS_KEY": S3_SECRET,
    }
    _, problem = s3_config_from_env(full | {"SPK_S3_PATH_STYLE": "maybe"})
    assert problem is not None and "PATH_STYLE" in problem
    _, problem = s3_config_from_env(full | {"SPK_S3_ENDPOINT": "http://u:p@host"})
    assert problem is not None and "credentials" in problem
    config, problem = s3_config_from_env(full | {"SPK_S3_PATH_STYLE": "TRUE"})
    assert problem is None and config == S3Config("b", "r", "id", S3_SECRET, None, True)
    assert S3_SECRET not in repr(config)


def test_partial_s3_config_registers_nothing_and_names_the_variable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"SPK_S3_BUCKET": "b", "SPK_S3_REGION": "r", "SPK_S3_SECRET_ACCESS_KEY": S3_SECRET}
    with caplog.at_level(logging.INFO):
        registry = build_registry(tmp_path, env)
    assert registry.names() == ["filesystem", "database"]
    assert "SPK_S3_ACCESS_KEY_ID is not set" in caplog.text
    assert S3_SECRET not in caplog.text
    with pytest.raises(InvalidArgument, match="SPK_S3_ACCESS_KEY_ID"):
        registry.set_active("s3")


class _Broken:
    """A backend that is down: every call fails (a thing we do not own, so a fake)."""

    name = "broken"

    def _down(self, *args: object) -> Any:
        raise StoreError("broken backend is down")

    has = size = local_path = open_read = put_file = delete = list = _down


def test_registry_writes_to_active_and_reads_fall_back(
    sqlite_db: pw.Database, tmp_path: Path
) -> None:
    fs, db = FilesystemBlobStore(tmp_path / "blobs"), DatabaseBlobStore()
    registry = StoreRegistry([fs, _Broken(), db])  # type: ignore[list-item]
    sha, src = make_blob(tmp_path, b"only in the database")
    db.put_file(sha, src)
    # The active store (filesystem) lacks it and one backend is down: still served.
    assert registry.has(sha) and registry.size(sha) == len(b"only in the database")
    with registry.open_read(sha, 5) as f:
        assert f.read() == b"only in the database"[5:]
    new_sha, new_src = make_blob(tmp_path, b"new blob")
    registry.set_active("database")
    registry.put_file(new_sha, new_src)
    assert db.has(new_sha) and not fs.has(new_sha)
    fs.put_file(sha, src)
    assert registry.local_path(sha) == fs.path_for(sha) and registry.local_path(new_sha) is None
    with pytest.raises(StoreError, match="broken"):  # tries all, then reports the failure
        registry.delete(sha)
    assert not fs.has(sha) and not db.has(sha)
    missing = hashlib.sha256(b"nowhere").hexdigest()
    with pytest.raises(StoreError, match="broken"):
        registry.open_read(missing)  # absent, but one backend could not say: not a NotFound
    ok = StoreRegistry([fs, db])
    with pytest.raises(NotFound):
        ok.open_read(missing)
    database_proxy.close()


def test_core_serves_blobs_from_s3_and_keeps_credentials_secret(
    tmp_path: Path, s3_server: MotoS3, package_index: PackageIndex, wheel_dir: Path
) -> None:
    bucket = s3_server.new_bucket()
    wheel = build_wheel(
        WheelSpec("s3pkg", "1.0", files={"s3pkg/d.bin": os.urandom(300_000)}), wheel_dir
    )
    core = CoreProcess(tmp_path / "core", env=s3_server.env(bucket)).start()
    try:
        admin = core.admin()
        names = [b.name for b in admin.ListStorageBackends().backends]
        assert names == ["filesystem", "database", "s3"]
        with pytest.raises(grpc.RpcError) as err:
            admin.SetStorageBackend(apb.SetStorageBackendRequest(name="tape"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tape" in (err.value.details() or "")
        active = admin.SetStorageBackend(apb.SetStorageBackendRequest(name="s3"))
        assert active.name == "s3" and active.active
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        admin.SetPackages(
            apb.SetPackagesRequest(packages=[apb.PackageSpec(name="s3pkg", version="1.0")])
        )
        state = admin.install_and_wait()
        assert state.status == apb.INSTALL_STATUS_READY, state.error
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"blobs/{sha[:2]}/{sha}.whl"]
        assert not list((core.data_dir / "blobs").rglob("*.whl"))
        stats = {b.name: b for b in admin.ListStorageBackends().backends}
        assert stats["s3"].blob_count == 1 and stats["s3"].bytes == wheel.stat().st_size

        token = admin.CreateSatellite(apb.CreateSatelliteRequest(name="s3-probe")).token
        with grpc.insecure_channel(core.target) as channel:
            stub = distribution_pb2_grpc.PackageDistributionStub(channel)
            chunks = stub.DownloadBlob(
                dpb.DownloadBlobRequest(sha256=sha, offset=1000),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=30,
            )
            assert b"".join(c.data for c in chunks) == wheel.read_bytes()[1000:]
    finally:
        core.stop()
    assert S3_SECRET not in core.log()
    for path in core.data_dir.rglob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path
