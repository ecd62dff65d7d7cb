"""Measure storage migration throughput (figures quoted in docs/storage.md).

    .venv/bin/python scripts/bench_migration.py [--big N] [--small N]

Seeds the filesystem store with N big (2 MiB) and N small (16 KiB) random blobs, then migrates
them, unthrottled and with delete_source, filesystem -> database (SQLite) -> filesystem, and
filesystem -> database (Postgres, a scratch database) and filesystem -> S3 (moto on loopback).
Every copy is read back and hashed, as in production; the timings include that.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.state.db import BlobRecord, Database, open_database  # noqa: E402
from core.state.locks import InstallerLock  # noqa: E402
from core.storage.backends import StoreRegistry  # noqa: E402
from core.storage.blobstore import FilesystemBlobStore  # noqa: E402
from core.storage.database_store import DatabaseBlobStore  # noqa: E402
from core.storage.migration import Migrator  # noqa: E402
from core.storage.s3_store import S3BlobStore, s3_config_from_env  # noqa: E402
from tests.storage_servers import FreshPostgres, MotoS3  # noqa: E402

MiB = 1024 * 1024


def seed(root: Path, fs: FilesystemBlobStore, big: int, small: int) -> int:
    total = 0
    for i, size in enumerate([2 * MiB] * big + [16 * 1024] * small):
        data = os.urandom(size - 4) + i.to_bytes(4, "big")
        sha = hashlib.sha256(data).hexdigest()
        src = root / "seed.tmp"
        src.write_bytes(data)
        fs.put_file(sha, src)
        src.unlink()  # the store may have hard-linked it: never rewrite a file handed over
        BlobRecord.create(sha256=sha, size=len(data), backend="filesystem")
        total += len(data)
    return total


async def migrate(migrator: Migrator, target: str) -> float:
    start = time.perf_counter()
    await migrator.start(target, delete_source=True)
    await migrator.wait()
    state = await migrator.state()
    assert state.status == "done", state.error
    return time.perf_counter() - start


def report(label: str, seconds: float, total: int, count: int) -> None:
    print(
        f"{label:<34} {seconds:6.2f} s  {total / MiB / seconds:7.1f} MiB/s"
        f"  {count / seconds:7.1f} blobs/s"
    )


async def run(root: Path, label: str, url: str | None, big: int, small: int, s3: MotoS3) -> None:
    workdir = root / label.replace(" ", "-")
    workdir.mkdir()
    db = open_database(workdir, url)
    database = Database(db)
    fs = FilesystemBlobStore(workdir / "blobs")
    stores: list = [fs, DatabaseBlobStore()]
    config, _ = s3_config_from_env(s3.env(s3.new_bucket()))
    assert config is not None
    stores.append(S3BlobStore(config))
    registry = StoreRegistry(stores)
    migrator = Migrator(database, InstallerLock(db), registry, workdir / "work")
    total = seed(workdir, fs, big, small)
    count = big + small
    targets = ["database", "filesystem"] if url is None else ["database"]
    if url is None:
        targets += ["s3", "filesystem"]
    source = "filesystem"
    for target in targets:
        seconds = await migrate(migrator, target)
        report(f"{source} -> {target} ({label})", seconds, total, count)
        source = target
    database.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=40)
    parser.add_argument("--small", type=int, default=400)
    args = parser.parse_args()
    print(f"{args.big} x 2 MiB + {args.small} x 16 KiB blobs, delete_source, read-back verified")
    with tempfile.TemporaryDirectory() as tmp, MotoS3(Path(tmp)) as s3:
        asyncio.run(run(Path(tmp), "sqlite", None, args.big, args.small, s3))
        with FreshPostgres() as pg:
            asyncio.run(run(Path(tmp), "postgres", pg.url, args.big, args.small, s3))


if __name__ == "__main__":
    main()
