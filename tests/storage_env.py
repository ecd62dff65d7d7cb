"""An in-process storage side of the core for GC, migration and lock tests: real database (SQLite
or Postgres), real filesystem and database stores, real lockfile history; no gRPC, no clock.

    env = StorageEnv(tmp_path)                    # or StorageEnv(tmp_path, postgres_url)
    sha = env.add_blob(b"...", created_at=1000)   # stored + indexed (BlobRecord)
    h = env.publish([sha1, sha2])                 # a one-environment release, made desired
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import peewee as pw

from core.state import releases
from core.state.db import BlobRecord, Database, InstallStateRow, database_proxy, open_database
from core.state.keys import new_signing_key
from core.state.locks import InstallerLock
from core.storage.backends import StoreRegistry
from core.storage.blobstore import BlobStore, FilesystemBlobStore
from core.storage.database_store import DatabaseBlobStore
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment

ENV = TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_17_x86_64")


class StorageEnv:
    def __init__(self, tmp_path: Path, url: str | None = None, chunk_size: int = 4096) -> None:
        self.tmp_path = tmp_path
        self.db: pw.Database = open_database(tmp_path, url)
        self.database = Database(self.db)
        self.fs = FilesystemBlobStore(tmp_path / "blobs")
        self.dbstore = DatabaseBlobStore(chunk_size=chunk_size)
        self.registry = StoreRegistry([self.fs, self.dbstore])
        self.lock = InstallerLock(self.db)
        self.key = new_signing_key()
        self._n = 0

    def add_blob(self, data: bytes, created_at: int, store: BlobStore | None = None) -> str:
        target = store or self.fs
        sha = hashlib.sha256(data).hexdigest()
        src = self.tmp_path / f"src-{sha[:12]}"
        src.write_bytes(data)
        target.put_file(sha, src)
        src.unlink()
        BlobRecord.create(sha256=sha, size=len(data), backend=target.name, created_at=created_at)
        return sha

    def publish(self, shas: list[str], desired: bool = True) -> str:
        self._n += 1
        entries = [
            ManifestEntry(f"pkg{self._n}x{i}", "1.0", f"pkg{self._n}x{i}-1.0.whl", sha, 1, True)
            for i, sha in enumerate(shas)
        ]
        with database_proxy.atomic():
            before = InstallStateRow.get_by_id(1)
            _, signed = releases.publish_release(
                {"default": Manifest.build(entries, ENV)}, self.key, ["default"]
            )
            if not desired:  # recorded in the history only, the way an older release is
                InstallStateRow.update(
                    lockfile_hash=before.lockfile_hash, desired_sequence=before.desired_sequence
                ).where(InstallStateRow._meta.primary_key == 1).execute()
        return signed["default"].lockfile_hash

    @staticmethod
    def set_desired(lockfile_hash: str) -> None:
        InstallStateRow.update(
            lockfile_hash=lockfile_hash, desired_sequence=releases.release_for_hash(lockfile_hash)
        ).where(InstallStateRow._meta.primary_key == 1).execute()

    @staticmethod
    def indexed() -> dict[str, str]:
        return {r.sha256: r.backend for r in BlobRecord.select()}

    def close(self) -> None:
        self.database.close()
        if not self.db.is_closed():
            self.db.close()
