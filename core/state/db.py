"""peewee models behind one DatabaseProxy, versioned schema migrations, and a thread to run on.

peewee is synchronous and grpc.aio is not: every query runs through `Database.run`, which hands it
to a small thread pool so the event loop never waits on SQLite or Postgres.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import peewee as pw

from shared.errors import StoreError

database_proxy = pw.DatabaseProxy()
T = TypeVar("T")


def now() -> int:
    return int(time.time())


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy


class SchemaVersion(BaseModel):
    version = pw.IntegerField()


class Setting(BaseModel):
    """Small JSON documents: registry config, size cap, keys (encrypted)."""

    key = pw.CharField(primary_key=True, max_length=64)
    value = pw.TextField()


class AllowlistPackage(BaseModel):
    name = pw.CharField(primary_key=True, max_length=128)
    version = pw.CharField(max_length=64)
    enabled = pw.BooleanField(default=True)
    added_by = pw.CharField(max_length=128, default="")
    added_at = pw.BigIntegerField(default=now)
    updated_at = pw.BigIntegerField(default=now)


class AdminToken(BaseModel):
    token_hash = pw.CharField(primary_key=True, max_length=64)
    role = pw.CharField(max_length=16)
    label = pw.CharField(max_length=128, default="")
    created_at = pw.BigIntegerField(default=now)


class Lockfile(BaseModel):
    """Published manifests (history), one per environment and release. `sequence` is the newest
    release that (re-)signed it; it increases on every publish, rollbacks included."""

    lockfile_hash = pw.CharField(primary_key=True, max_length=64)
    sequence = pw.BigIntegerField(index=True)
    manifest_json = pw.TextField()
    entry_count = pw.IntegerField()
    total_size = pw.BigIntegerField()
    created_at = pw.BigIntegerField(default=now)
    environment = pw.CharField(max_length=64, default="")  # name at publish time


class EnvironmentRow(BaseModel):
    """The admin's target environments; `position` orders them (the first is the default)."""

    name = pw.CharField(primary_key=True, max_length=64)
    python_version = pw.CharField(max_length=16)
    implementation = pw.CharField(max_length=8, default="cp")
    abi = pw.CharField(max_length=16, default="")
    platform = pw.CharField(max_length=512, default="")  # comma-separated; "" = the core's own
    position = pw.IntegerField(index=True)
    created_at = pw.BigIntegerField(default=now)

    class Meta:
        table_name = "environment"


class Release(BaseModel):
    """One install's result: a manifest per environment, all signed under this sequence."""

    sequence = pw.BigIntegerField(primary_key=True)
    created_at = pw.BigIntegerField(default=now)


class ReleaseManifest(BaseModel):
    sequence = pw.BigIntegerField(index=True)
    environment = pw.CharField(max_length=64)
    lockfile_hash = pw.CharField(max_length=64, index=True)
    position = pw.IntegerField(default=0)  # the environment's place at publish; 0 = default

    class Meta:
        primary_key = pw.CompositeKey("sequence", "environment")


BLOB_WHEEL = "wheel"
BLOB_PATCH = "patch"  # a binary delta between two wheels (DeltaPatch says which)


class BlobRecord(BaseModel):
    sha256 = pw.CharField(primary_key=True, max_length=64)
    size = pw.BigIntegerField()
    backend = pw.CharField(max_length=32, default="filesystem")
    created_at = pw.BigIntegerField(default=now)
    kind = pw.CharField(max_length=8, default=BLOB_WHEEL)  # BLOB_WHEEL or BLOB_PATCH


class DeltaPatch(BaseModel):
    """One computed (base, target) pair: `ready` names its patch blob; `useless` remembers a
    pair whose patch was not worth storing (too big, or beyond the window limit), so it is not
    computed again."""

    target_sha256 = pw.CharField(max_length=64, index=True)
    base_sha256 = pw.CharField(max_length=64)
    status = pw.CharField(max_length=8)  # ready | useless
    patch_sha256 = pw.CharField(max_length=64, default="", index=True)
    patch_size = pw.BigIntegerField(default=0)  # also for `useless`: how big it came out
    target_size = pw.BigIntegerField(default=0)
    window_log = pw.IntegerField(default=0)
    compute_ms = pw.BigIntegerField(default=0)
    reason = pw.CharField(max_length=256, default="")
    created_at = pw.BigIntegerField(default=now)

    class Meta:
        primary_key = pw.CompositeKey("target_sha256", "base_sha256")


class InstallStateRow(BaseModel):
    """A single row (id 1): the desired hash and the last install attempt."""

    status = pw.CharField(max_length=16, default="idle")
    lockfile_hash = pw.CharField(max_length=64, default="")
    attempted_hash = pw.CharField(max_length=64, default="")
    started_at = pw.BigIntegerField(default=0)
    finished_at = pw.BigIntegerField(default=0)
    total_bytes = pw.BigIntegerField(default=0)
    warnings_json = pw.TextField(default="[]")
    error = pw.TextField(default="")
    phase = pw.CharField(max_length=32, default="")
    wheels_done = pw.IntegerField(default=0)
    wheels_total = pw.IntegerField(default=0)
    owner = pw.CharField(max_length=64, default="")
    desired_sequence = pw.BigIntegerField(default=0)  # the desired release (0: none yet)
    environments_json = pw.TextField(default="[]")  # per-environment progress and results


class SatelliteRow(BaseModel):
    name = pw.CharField(primary_key=True, max_length=64)
    token_hash = pw.CharField(max_length=64, unique=True)
    revoked = pw.BooleanField(default=False)
    created_at = pw.BigIntegerField(default=now)
    last_seen = pw.BigIntegerField(default=0)
    desired_hash = pw.CharField(max_length=64, default="")
    current_hash = pw.CharField(max_length=64, default="")
    status = pw.CharField(max_length=16, default="unknown")
    error = pw.TextField(default="")
    last_pull_bytes = pw.BigIntegerField(default=0)
    last_pull_blobs = pw.BigIntegerField(default=0)
    last_duration_ms = pw.BigIntegerField(default=0)
    last_wheel_bytes = pw.BigIntegerField(default=0)  # what the last pull produced
    last_pull_patches = pw.BigIntegerField(default=0)  # of last_pull_blobs: from a patch
    agent_version = pw.CharField(max_length=64, default="")
    python_version = pw.CharField(max_length=64, default="")
    platform = pw.CharField(max_length=128, default="")
    environment = pw.CharField(max_length=64, default="")  # serving it; "" while unserved
    host_json = pw.TextField(default="")  # its HostEnvironment as reported on subscribe
    # Several instances (Postgres): the instance holding its refresh stream renews this lease,
    # so every instance can tell connected from offline (core/fanout/stream_leases.py).
    stream_owner = pw.CharField(max_length=64, default="")
    stream_until = pw.BigIntegerField(default=0)


class StoredBlob(BaseModel):
    """A blob held by the database backend; written in the same transaction as its chunks, so a
    header row means the blob is complete."""

    sha256 = pw.CharField(primary_key=True, max_length=64)
    size = pw.BigIntegerField()
    chunk_size = pw.IntegerField()
    chunk_count = pw.IntegerField()


class BlobChunk(BaseModel):
    """One slice (`chunk_size` bytes, the last one shorter) of a StoredBlob; reads fetch by seq."""

    sha256 = pw.CharField(max_length=64)
    seq = pw.IntegerField()
    data = pw.BlobField()

    class Meta:
        primary_key = pw.CompositeKey("sha256", "seq")


class WheelOrigin(BaseModel):
    """Where each wheel of a published manifest came from, for exports (PEP 751 `url`, `index`).

    Outside the signed manifest on purpose: the lockfile hash covers the manifest's canonical
    bytes, and where a file was fetched does not change what it is. Never credentials: URLs are
    stored without userinfo, query or fragment (core/install/exports.py `public_url`).
    """

    lockfile_hash = pw.CharField(max_length=64, index=True)
    sha256 = pw.CharField(max_length=64)
    url = pw.TextField(default="")  # the file as the resolver named it
    index_url = pw.TextField(default="")  # the index it was resolved from

    class Meta:
        table_name = "wheel_origin"
        primary_key = pw.CompositeKey("lockfile_hash", "sha256")


class AuditRow(BaseModel):
    """One vulnerability audit of a release (history: every audit is kept)."""

    id = pw.AutoField()
    sequence = pw.BigIntegerField(index=True)  # the release audited
    checked_at = pw.BigIntegerField()
    trigger = pw.CharField(max_length=16)  # publish | schedule | on-demand
    source = pw.CharField(max_length=512)
    status = pw.CharField(max_length=16)  # ok | unknown
    result_json = pw.TextField()  # advisories, counts, warnings (core/state/audits.py)

    class Meta:
        table_name = "audit"


ALL_MODELS: list[type[BaseModel]] = [
    SchemaVersion,
    Setting,
    AllowlistPackage,
    AdminToken,
    Lockfile,
    BlobRecord,
    InstallStateRow,
    SatelliteRow,
]  # as of migration 1; later tables are created by their own migration


def upsert(model: type[BaseModel], **fields: Any) -> None:
    """Insert or overwrite one row by primary key; works on SQLite and Postgres (no REPLACE)."""
    pk = model._meta.primary_key
    assert pk, f"{model.__name__} has no primary key"
    update = {f: v for f, v in fields.items() if f != pk.name}
    model.insert(**fields).on_conflict(conflict_target=[pk], update=update).execute()


def _migration_1(db: pw.Database) -> None:
    db.create_tables(ALL_MODELS)
    InstallStateRow.create(id=1)


def _migration_2(db: pw.Database) -> None:
    db.create_tables([StoredBlob, BlobChunk])


def _add_missing_columns(db: pw.Database, new_columns: list[pw.Field]) -> None:
    from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate

    migrator = (
        PostgresqlMigrator(db) if isinstance(db, pw.PostgresqlDatabase) else SqliteMigrator(db)
    )
    # A fresh database got them from migration 1 (which creates today's models).
    operations = [
        migrator.add_column(field.model._meta.table_name, field.column_name, field)
        for field in new_columns
        if field.column_name not in {c.name for c in db.get_columns(field.model._meta.table_name)}
    ]
    migrate(*operations)


def _migration_3(db: pw.Database) -> None:
    """Environments and releases. A core upgraded in place keeps serving its history: the
    target it resolved for becomes the first environment, each published lockfile a release."""
    _add_missing_columns(
        db,
        [
            Lockfile.environment,
            InstallStateRow.desired_sequence,
            InstallStateRow.environments_json,
            SatelliteRow.environment,
            SatelliteRow.host_json,
        ],
    )
    db.create_tables([EnvironmentRow, Release, ReleaseManifest])
    from core.state.upgrade import first_environment_from_history

    first_environment_from_history()


def _migration_4(db: pw.Database) -> None:
    """Audits and exports: the audit history, and where each published wheel came from. Releases
    published before this have no origins; exports then name the configured index instead."""
    db.create_tables([WheelOrigin, AuditRow])


def _migration_5(db: pw.Database) -> None:
    """Binary deltas: patch blobs in the blob index (`kind`), the computed pairs, and what a
    satellite's last sync produced next to what it pulled."""
    _add_missing_columns(
        db, [BlobRecord.kind, SatelliteRow.last_wheel_bytes, SatelliteRow.last_pull_patches]
    )
    db.create_tables([DeltaPatch])


def _migration_6(db: pw.Database) -> None:
    """Refresh-stream leases, so each instance behind a balancer sees who is connected."""
    _add_missing_columns(db, [SatelliteRow.stream_owner, SatelliteRow.stream_until])


# Append-only: each entry brings the schema from version i to i + 1.
MIGRATIONS: list[Callable[[pw.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: pw.Database) -> int:
    """Apply pending migrations in one transaction each; returns the resulting version."""
    with db.atomic():
        if not db.table_exists(SchemaVersion._meta.table_name):
            db.create_tables([SchemaVersion])
            SchemaVersion.create(version=0)
    row = SchemaVersion.get()
    if row.version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema is version {row.version}, this core knows up to {SCHEMA_VERSION};"
            " upgrade the core"
        )
    for version in range(row.version, SCHEMA_VERSION):
        with db.atomic():
            MIGRATIONS[version](db)
            SchemaVersion.update(version=version + 1).execute()
    return SCHEMA_VERSION


def _require_driver(url: str) -> None:
    """A Postgres URL without psycopg2 installed: say what to install, in one line (peewee would
    fail later with "Postgres driver not installed!" and a traceback). The URL is never echoed:
    it may carry a password."""
    scheme = url.partition("://")[0].lower()
    if not scheme.startswith("postgres"):
        return
    try:
        import psycopg2  # noqa: F401 - only whether it imports
    except ImportError:
        raise StoreError(
            f"--database-url is a {scheme}:// URL but the Postgres driver (psycopg2) is not"
            " installed: pip install 'script-packages[postgres]'"
        ) from None


def open_database(data_dir: Path, url: str | None = None) -> pw.Database:
    """SQLite in the data dir (WAL) by default; Postgres when a postgres:// URL is given."""
    if url:
        from playhouse.db_url import connect

        _require_driver(url)
        db: pw.Database = connect(url)
    else:
        db = pw.SqliteDatabase(
            str(data_dir / "core.sqlite3"),
            pragmas={
                "journal_mode": "wal",
                "synchronous": "full",  # a published row must survive power loss
                "foreign_keys": 1,
                "busy_timeout": 10_000,
            },
            check_same_thread=False,
        )
    database_proxy.initialize(db)
    db.connect(reuse_if_open=True)
    migrate(db)
    return db


class Database:
    """Runs peewee work off the event loop. SQLite gets one writer thread; Postgres a few."""

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        workers = 1 if isinstance(db, pw.SqliteDatabase) else 4
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        # peewee keeps one connection per thread; open it lazily in each pool thread.
        self.db.connect(reuse_if_open=True)
        return fn(*args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if not self.db.is_closed():
            self.db.close()
