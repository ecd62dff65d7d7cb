"""core/storage/migration.py: the work set and throttle (pure), in-process runs over real stores
(including S3 on moto, a lying target and a corrupt source), and the real core killed
mid-migration."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

from core.state.db import BlobRecord, open_database
from core.state.keys import SECRET_KEY_ENV
from core.state.locks import Activity
from core.storage.backends import StoreRegistry, load_active_name, save_active_name
from core.storage.blobstore import FilesystemBlobStore
from core.storage.database_store import DatabaseBlobStore
from core.storage.migration import (
    MigrationState,
    Migrator,
    WorkItem,
    load_state,
    save_state,
    throttle_delay,
    work_set,
)
from core.storage.s3_store import S3BlobStore, s3_config_from_env
from shared.errors import FailedPrecondition, InvalidArgument
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually, eventually_async
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.storage_env import StorageEnv
from tests.storage_servers import MotoS3
from tests.wheelfactory import WheelSpec, build_wheel

T0 = 1_800_000_000


def test_work_set_is_every_blob_not_on_the_target() -> None:
    rows = [WorkItem("c", 3, "filesystem"), WorkItem("a", 1, "database"), WorkItem("b", 2, "s3")]
    assert [w.sha256 for w in work_set(rows, "database")] == ["b", "c"]
    assert work_set(rows, "nowhere") == sorted(rows, key=lambda w: w.sha256)
    assert work_set([], "s3") == []


def test_throttle_delay() -> None:
    assert throttle_delay(10_000, 0.0, 0) == 0.0  # unthrottled
    assert throttle_delay(1_000, 0.5, 1_000) == 0.5  # 1 s worth of bytes after 0.5 s
    assert throttle_delay(1_000, 2.0, 1_000) == 0.0  # already slower than the limit


@pytest.fixture
def env(tmp_path: Path) -> Iterator[StorageEnv]:
    e = StorageEnv(tmp_path)
    yield e
    e.close()


def seed(env: StorageEnv, count: int, size: int = 10_000) -> dict[str, bytes]:
    blobs = {}
    for i in range(count):
        data = os.urandom(size) + i.to_bytes(4, "big")
        blobs[env.add_blob(data, T0)] = data
    return blobs


def verify_on(store: FilesystemBlobStore | DatabaseBlobStore | S3BlobStore, shas: set[str]) -> None:
    """Zero missing, zero mismatched: every blob read back from the store hashes to its id."""
    for sha in shas:
        with store.open_read(sha) as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, sha


async def test_migrates_verifies_flips_and_deletes_sources(env: StorageEnv) -> None:
    blobs = seed(env, 12)
    migrator = Migrator(env.database, env.lock, env.registry, env.tmp_path / "work")
    with pytest.raises(InvalidArgument, match=r"^target: unknown storage backend .tape."):
        await migrator.start("tape", delete_source=False)
    started = await migrator.start("database", delete_source=True)
    assert started.status == "migrating" and started.total == 12
    await migrator.wait()
    state = await migrator.state()
    assert (state.status, state.done, state.total, state.error) == ("done", 12, 12, "")
    assert state.bytes == sum(len(d) for d in blobs.values())
    assert set(env.indexed().values()) == {"database"}
    verify_on(env.dbstore, set(blobs))
    assert list(env.fs.list()) == []  # delete_source
    assert load_active_name() == "database" and env.registry.name == "database"
    assert not list((env.tmp_path / "work").glob("*"))  # staging copies cleaned up


class LyingStore(DatabaseBlobStore):
    """Stores correctly but reads one blob back wrong (silent corruption we cannot cause)."""

    name = "liar"

    def __init__(self, lie_about: str) -> None:
        super().__init__()
        self.lie_about = lie_about

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        import io

        real = super().open_read(sha256, offset).read()
        if sha256 == self.lie_about:
            real = real[:-1] + bytes([real[-1] ^ 1])
        return io.BytesIO(real)


async def test_read_back_mismatch_stops_with_error_and_keeps_the_active_backend(
    env: StorageEnv,
) -> None:
    blobs = sorted(seed(env, 5))
    liar = LyingStore(lie_about=blobs[2])
    registry = StoreRegistry([env.fs, liar])
    migrator = Migrator(env.database, env.lock, registry, env.tmp_path / "work")
    await migrator.start("liar", delete_source=True)
    await migrator.wait()
    state = await migrator.state()
    assert state.status == "error" and blobs[2] in state.error and "reads back" in state.error
    assert state.done == 2
    assert load_active_name() == "filesystem" and registry.name == "filesystem"
    rows = env.indexed()
    assert [rows[s] for s in blobs] == ["liar", "liar", "filesystem", "filesystem", "filesystem"]
    assert not liar.has(blobs[2])  # the bad copy is gone, so a rerun copies afresh
    assert env.fs.has(blobs[2])  # and the source was not touched
    liar.lie_about = ""
    await migrator.start("liar", delete_source=True)  # a new run: only the 3 left to move
    await migrator.wait()
    state = await migrator.state()
    assert (state.status, state.done, state.total) == ("done", 3, 3)
    assert set(env.indexed().values()) == {"liar"}


async def test_corrupt_source_stops_the_migration_naming_the_blob(env: StorageEnv) -> None:
    sha = next(iter(seed(env, 1)))
    env.fs.path_for(sha).chmod(0o644)
    env.fs.path_for(sha).write_bytes(b"bit rot")
    migrator = Migrator(env.database, env.lock, env.registry, env.tmp_path / "work")
    await migrator.start("database", delete_source=True)
    await migrator.wait()
    state = await migrator.state()
    assert state.status == "error" and sha in state.error and "corrupt" in state.error
    assert not env.dbstore.has(sha) and env.indexed()[sha] == "filesystem"


async def test_stuck_migration_resumes_including_a_copy_made_before_the_crash(
    env: StorageEnv,
) -> None:
    blobs = sorted(seed(env, 6))
    # As a crash leaves it: 2 flipped, a third copied to the target but its row not yet flipped,
    # and a fourth copied whose source copy is gone since (only the target has it).
    for sha in blobs[:4]:
        src = env.fs.path_for(sha)
        env.dbstore.put_file(sha, src)
    env.fs.delete(blobs[3])
    BlobRecord.update(backend="database").where(BlobRecord.sha256.in_(blobs[:2])).execute()
    save_state(MigrationState("migrating", "database", False, 2, 6, 20_008, "", T0))
    migrator = Migrator(env.database, env.lock, env.registry, env.tmp_path / "work")
    lease = await env.lock.acquire(Activity.INSTALL)
    assert not await migrator.resume_if_stuck()  # someone holds the lock: not now
    await lease.release()
    assert await migrator.resume_if_stuck()
    await migrator.wait()
    state = load_state()
    assert (state.status, state.done, state.total) == ("done", 6, 6)
    verify_on(env.dbstore, set(blobs))
    assert env.fs.has(blobs[0])  # delete_source was false
    assert not await migrator.resume_if_stuck()  # done: nothing to resume


async def test_throttle_and_refusals_while_migrating(env: StorageEnv) -> None:
    seed(env, 4, size=1000)
    slept: list[float] = []
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await gate.wait()  # hold the migration mid-way so we can poke at it

    migrator = Migrator(
        env.database, env.lock, env.registry, env.tmp_path / "work", lambda: 0.0, sleep
    )
    await migrator.start("database", delete_source=False, max_bytes_per_second=2008)
    await eventually_async(lambda: bool(slept), timeout=10)
    assert slept == [0.5]  # 1004 bytes at 2008 B/s with a frozen clock
    with pytest.raises(FailedPrecondition, match="a storage migration is running"):
        await migrator.switch_backend("database")
    with pytest.raises(FailedPrecondition, match="a storage migration is running"):
        await migrator.start("filesystem", delete_source=False)
    gate.set()
    await migrator.wait()
    assert (await migrator.state()).status == "done"
    await migrator.switch_backend("filesystem")  # allowed again once done
    assert load_active_name() == "filesystem"


async def test_migration_to_s3_and_back(env: StorageEnv, s3_server: MotoS3) -> None:
    config, _ = s3_config_from_env(s3_server.env(s3_server.new_bucket()))
    assert config is not None
    s3 = S3BlobStore(config)
    registry = StoreRegistry([env.fs, env.dbstore, s3])
    blobs = seed(env, 4, size=200_000)
    migrator = Migrator(env.database, env.lock, registry, env.tmp_path / "work")
    for target in ("s3", "database"):
        await migrator.start(target, delete_source=True)
        await migrator.wait()
        assert (await migrator.state()).status == "done"
        assert set(env.indexed().values()) == {target}
    verify_on(env.dbstore, set(blobs))
    assert list(s3.list()) == [] and list(env.fs.list()) == []


# ---- the real core, killed mid-migration ----


def test_core_killed_mid_migration_resumes_with_zero_missing_or_mismatched(
    tmp_path: Path,
) -> None:
    core_dir = tmp_path / "core"
    core_dir.mkdir()
    seeded = StorageEnv(core_dir)  # the core's own SQLite and blob dir, before it first starts
    count, size = 40, 200 * 1024
    blobs = seed(seeded, count, size)
    seeded.close()
    core = CoreProcess(core_dir)
    core.start()
    admin = core.admin()
    admin.MigrateStorage(
        apb.MigrateStorageRequest(
            target="database", delete_source=True, max_bytes_per_second=4 * size * 4
        )
    )

    def done_at_least(n: int) -> apb.StorageMigrationState | None:
        state = core.admin().GetStorageMigrationState()
        assert state.status != "error", state.error
        return state if state.done >= n else None

    kills = []
    for kill_after in (6, None, 24):  # mid-run, right after a restart's resume, mid-run again
        if kill_after is not None:
            wanted: int = kill_after
            eventually(lambda: done_at_least(wanted), timeout=30, interval=0.02)
        core.stop(signal.SIGKILL)
        kills.append(kill_after)
        core.start()  # resumes on its own at startup
    state = eventually(
        lambda: (s := core.admin().GetStorageMigrationState()).status == "done" and s, timeout=60
    )
    assert (state.done, state.total) == (count, count), state
    assert core.admin().GetStorageBackend().name == "database"
    core.stop()
    assert "resuming the storage migration" in core.log()

    db = open_database(core_dir)
    try:
        assert {r.backend for r in BlobRecord.select()} == {"database"}
        assert BlobRecord.select().count() == count
        verify_on(DatabaseBlobStore(), set(blobs))
        assert list(FilesystemBlobStore(core_dir / "blobs").list()) == []
        assert sorted(DatabaseBlobStore().list()) == sorted(blobs)
    finally:
        db.close()


def test_refusals_during_a_migration_on_the_real_core(tmp_path: Path) -> None:
    core_dir = tmp_path / "core"
    core_dir.mkdir()
    seeded = StorageEnv(core_dir)
    seed(seeded, 4, 50_000)
    seeded.close()
    core = CoreProcess(core_dir).start()
    try:
        admin = core.admin()
        admin.MigrateStorage(
            apb.MigrateStorageRequest(target="database", max_bytes_per_second=40_000)
        )
        for call, request in [
            (admin.SetStorageBackend, apb.SetStorageBackendRequest(name="database")),
            (admin.InstallNow, apb.InstallNowRequest()),
            (admin.GcBlobs, apb.GcBlobsRequest(dry_run=True)),
            (admin.MigrateStorage, apb.MigrateStorageRequest(target="filesystem")),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "a storage migration is running" in (err.value.details() or "")
        state = admin.GetStorageMigrationState()
        assert state.status == "migrating" and state.max_bytes_per_second == 40_000
        with pytest.raises(grpc.RpcError) as err:
            admin.MigrateStorage(apb.MigrateStorageRequest(target="tape"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        core.stop()


# ---- Postgres mode: two real cores, a satellite syncing while blobs move ----


def test_postgres_cores_migrate_while_a_satellite_syncs(
    tmp_path: Path,
    postgres_url: str,
    package_index: PackageIndex,
    wheel_dir: Path,
    s3_server: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cores and the signing-key export all read these; instances share the secret key.
    monkeypatch.setenv("SPK_DATABASE_URL", postgres_url)
    monkeypatch.setenv(SECRET_KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    size = 200_000
    for name in ("pa", "pb", "pc", "pd"):
        build_wheel(WheelSpec(name, "1.0", files={f"{name}/d.bin": os.urandom(size)}), wheel_dir)
    build_wheel(WheelSpec("pe", "1.0"), wheel_dir)
    # The first instance starts without S3: instances sharing Postgres default to the database
    # backend (never the instance-local filesystem) and the first start records that choice.
    first_start = CoreProcess(tmp_path / "core-a").start()
    assert first_start.admin().GetStorageBackend().name == "database"
    first_start.stop()
    s3 = s3_server.env(s3_server.new_bucket())
    core_a = CoreProcess(tmp_path / "core-a", env=s3).start()
    core_b: CoreProcess | None = None
    sat: SatelliteProcess | None = None
    try:
        admin = core_a.admin()
        assert admin.GetStorageBackend().name == "database"  # the recorded choice holds
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        pins = [apb.PackageSpec(name=n, version="1.0") for n in ("pa", "pb", "pc", "pd")]
        admin.SetPackages(apb.SetPackagesRequest(packages=pins))
        first = admin.install_and_wait()
        assert first.status == apb.INSTALL_STATUS_READY, first.error
        # Core B is up before the copy starts, so what must happen during it is short.
        core_b = CoreProcess(tmp_path / "core-b", env=s3).start()  # same Postgres, another instance
        admin_b = core_b.admin()
        # ~16 s of copying: the satellite syncs in the middle of it, and core B's install is
        # refused while it runs (a holder gets a second to let go, not sixteen).
        admin.MigrateStorage(
            apb.MigrateStorageRequest(
                target="s3", delete_source=True, max_bytes_per_second=size // 4
            )
        )
        sat = SatelliteProcess(core_a, "sat-pg", tmp_path).register().start()
        eventually(
            lambda: sat.fleet_row().status == "ready" and sat.current() == first.lockfile_hash,
            timeout=30,
        )
        during = admin.GetStorageMigrationState()
        assert during.status == "migrating" and during.done < during.total, during

        with pytest.raises(grpc.RpcError) as err:
            admin_b.InstallNow(apb.InstallNowRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another core instance is running a storage migration" in (err.value.details() or "")
        assert admin_b.GetStorageMigrationState().status == "migrating"  # shared state

        done = eventually(
            lambda: (s := admin.GetStorageMigrationState()).status == "done" and s, timeout=90
        )
        assert done.done == done.total == 4 and done.error == ""
        assert admin_b.GetStorageBackend().name == "s3"

        # Core B installs (into the shared S3 store); the satellite, still on core A, hears of
        # it and downloads the new blob from A, which finds it in S3.
        admin_b.SetPackages(
            apb.SetPackagesRequest(packages=[*pins, apb.PackageSpec(name="pe", version="1.0")])
        )
        second = admin_b.install_and_wait()
        assert second.status == apb.INSTALL_STATUS_READY, second.error
        assert not list((core_b.data_dir / "blobs").rglob("*.whl"))
        eventually(
            lambda: sat.fleet_row().status == "ready" and sat.current() == second.lockfile_hash,
            timeout=30,
        )
        stats = {b.name: b for b in admin.ListStorageBackends().backends}
        assert stats["s3"].blob_count == 5 and stats["database"].blob_count == 0
        assert stats["filesystem"].blob_count == 0
    finally:
        for proc in (sat, core_b, core_a):
            if proc is not None:
                proc.stop()


def test_an_instance_local_backend_is_refused_when_instances_share_postgres(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPK_DATABASE_URL", postgres_url)
    monkeypatch.setenv(SECRET_KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    core = CoreProcess(tmp_path / "core").start()
    try:
        admin = core.admin()
        calls: list[tuple[str, Any]] = [
            ("SetStorageBackend", apb.SetStorageBackendRequest(name="filesystem")),
            ("MigrateStorage", apb.MigrateStorageRequest(target="filesystem")),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as refusal:
                getattr(admin, method)(request)
            assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'filesystem' is instance-local" in (refusal.value.details() or "")
        assert admin.GetStorageBackend().name == "database"
    finally:
        core.stop()
    # A deployment that chose the filesystem earlier (by hand, or before this rule) does not
    # start; the error names the fix, and the fix works.
    db = open_database(tmp_path / "core", postgres_url)
    save_active_name("filesystem")
    db.close()
    refused = CoreProcess(tmp_path / "core")
    with pytest.raises(RuntimeError) as err:
        refused.start()
    assert "'filesystem' is instance-local" in str(err.value)
    assert "spk-core storage migrate database" in str(err.value)
    fix = subprocess.run(
        [sys.executable, "-m", "core.app.cli", "storage", "migrate", "database",
         "--data-dir", str(tmp_path / "core"), "--database-url", postgres_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert fix.returncode == 0, fix.stderr
    assert "database is the active backend" in fix.stdout
    again = CoreProcess(tmp_path / "core").start()
    try:
        assert again.admin().GetStorageBackend().name == "database"
    finally:
        again.stop()
