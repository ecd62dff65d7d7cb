"""The set of blob store backends: writes go to the active one, reads fall back across all.

Reads falling back is what keeps the fleet syncing while a migration moves blobs, and what lets
an operator switch the active backend at any time: a blob is served wherever it is. The active
backend's name lives in the `storage_backend` setting so every core instance writes to the same
place; `put_file` re-reads it, so an instance never keeps writing to a backend another one left.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

import peewee as pw

from core.state.db import BlobRecord, Setting, upsert
from core.storage.blobstore import BlobStore, FilesystemBlobStore
from core.storage.database_store import DatabaseBlobStore
from core.storage.s3_store import S3BlobStore, s3_config_from_env
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, StoreError
from shared.names import check_sha256

log = logging.getLogger(__name__)
ACTIVE_KEY = "storage_backend"
DEFAULT_BACKEND = "filesystem"
# Backends only the instance that wrote them can read. Several core instances (state in
# Postgres) serve the same satellites, so a blob there would be NOT_FOUND on the others.
INSTANCE_LOCAL = frozenset({"filesystem"})
T = TypeVar("T")


class StoreRegistry:
    """A BlobStore over several backends. Thread-safe as far as its backends are."""

    def __init__(
        self,
        stores: Sequence[BlobStore],
        active: str = DEFAULT_BACKEND,
        load_active: Callable[[], str] | None = None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        self._stores = {s.name: s for s in stores}
        self._load_active = load_active
        self.shared = False  # the state is shared by several core instances (Postgres)
        # Backends that are known but not configured here, with the reason (for error messages).
        self.unavailable = dict(unavailable or {})
        self._active = self.get(active).name

    @property
    def name(self) -> str:
        """The active backend: where new blobs go."""
        return self._active

    def names(self) -> list[str]:
        return list(self._stores)

    def check_shared(self, name: str, field: str) -> None:
        """Refuse an instance-local backend as a destination when instances share the state."""
        if self.shared and name in INSTANCE_LOCAL:
            raise FailedPrecondition(f"{field} {name!r}: {local_backend_refusal(name)}")

    def get(self, name: str, field: str = "name") -> BlobStore:
        """The backend called `name`; InvalidArgument on `field` if there is none (and why)."""
        store = self._stores.get(name)
        if store is None:
            reason = f" ({self.unavailable[name]})" if name in self.unavailable else ""
            raise InvalidArgument(
                field,
                f"unknown storage backend {name!r}{reason}; registered: {', '.join(self._stores)}",
            )
        return store

    def set_active(self, name: str) -> None:
        self._active = self.get(name).name

    def shared_default(self) -> str:
        """The active backend a deployment that shares its state starts with: S3 when it is
        configured here, else the database every instance already shares."""
        return "s3" if "s3" in self._stores else "database"

    def _read_order(self) -> list[BlobStore]:
        active = self._stores[self._active]
        return [active, *(s for s in self._stores.values() if s is not active)]

    def _first(self, sha256: str, fn: Callable[[BlobStore], T | None]) -> T | None:
        """The first backend's answer that is not None/NotFound; StoreError if some failed."""
        failures: list[str] = []
        for store in self._read_order():
            try:
                result = fn(store)
            except NotFound:
                continue
            except StoreError as exc:
                # One backend being down must not hide a blob another one holds.
                log.warning("storage backend %s failed for %s: %s", store.name, sha256, exc)
                failures.append(f"{store.name}: {exc.message}")
                continue
            if result is not None:
                return result
        if failures:
            raise StoreError(f"blob {sha256} not readable: {'; '.join(failures)}")
        return None

    def locate(self, sha256: str) -> str | None:
        digest = check_sha256(sha256)
        return self._first(digest, lambda s: s.locate(digest))

    def has(self, sha256: str) -> bool:
        digest = check_sha256(sha256)
        return self._first(digest, lambda s: True if s.has(digest) else None) is not None

    def size(self, sha256: str) -> int | None:
        digest = check_sha256(sha256)
        return self._first(digest, lambda s: s.size(digest))

    def local_path(self, sha256: str) -> Path | None:
        """Best effort (it only saves a download): a backend that cannot answer is skipped."""
        digest = check_sha256(sha256)
        for store in self._read_order():
            try:
                if (path := store.local_path(digest)) is not None:
                    return path
            except (NotFound, StoreError):
                continue
        return None

    def open_read(self, sha256: str, offset: int = 0) -> BinaryIO:
        digest = check_sha256(sha256)
        reader = self._first(digest, lambda s: s.open_read(digest, offset))
        if reader is None:
            raise NotFound(f"blob {digest} is in no storage backend ({', '.join(self._stores)})")
        return reader

    def put_file(self, sha256: str, src: Path) -> bool:
        if self._load_active is not None:
            self.set_active(self._load_active())
        return self._stores[self._active].put_file(sha256, src)

    def delete(self, sha256: str) -> bool:
        """Delete from every backend; tries them all, then raises if any failed."""
        digest = check_sha256(sha256)
        deleted = False
        failures: list[str] = []
        for store in self._stores.values():
            try:
                deleted = store.delete(digest) or deleted
            except StoreError as exc:
                failures.append(f"{store.name}: {exc.message}")
        if failures:
            raise StoreError(f"cannot delete blob {digest}: {'; '.join(failures)}")
        return deleted

    def list(self) -> Iterator[str]:
        found: set[str] = set()
        for store in self._stores.values():
            found.update(store.list())
        return iter(sorted(found))


def build_registry(
    data_dir: Path, env: Mapping[str, str], load_active: Callable[[], str] | None = None
) -> StoreRegistry:
    """Filesystem and database always; S3 when its environment is complete (else it says why)."""
    fs = FilesystemBlobStore(data_dir / "blobs")
    fs.remove_stale_temp_files()
    stores: list[BlobStore] = [fs, DatabaseBlobStore()]
    unavailable: dict[str, str] = {}
    config, problem = s3_config_from_env(env)
    if problem is not None:
        unavailable["s3"] = problem
        log.error("S3 storage backend not registered: %s", problem)
    elif config is not None:
        try:
            stores.append(S3BlobStore(config))
            log.info("S3 storage backend registered (bucket %s)", config.bucket)
        except ImportError:
            unavailable["s3"] = "boto3 is not installed (pip install 'script-packages[s3]')"
            log.error("S3 storage backend not registered: %s", unavailable["s3"])
    else:
        unavailable["s3"] = "SPK_S3_* environment variables are not set"
    return StoreRegistry(stores, load_active=load_active, unavailable=unavailable)


# ---- the active backend and per-backend figures (sync; run through Database.run) ----


def load_active_name() -> str:
    row = Setting.get_or_none(Setting.key == ACTIVE_KEY)
    return DEFAULT_BACKEND if row is None else str(json.loads(row.value)["name"])


def stored_active_name() -> str | None:
    """The active backend an operator (or a first start) chose; None when never chosen."""
    row = Setting.get_or_none(Setting.key == ACTIVE_KEY)
    return None if row is None else str(json.loads(row.value)["name"])


def choose_active_once(default: str) -> str:
    """The stored choice, or `default` stored now (the first instance to start decides, so
    instances with different environments cannot pick different defaults)."""
    Setting.insert(
        key=ACTIVE_KEY, value=json.dumps({"name": default})
    ).on_conflict_ignore().execute()
    return load_active_name()


def local_backend_refusal(name: str) -> str:
    """Why `name` cannot be the active backend of cores that share their state, and the fix."""
    return (
        f"the blob backend {name!r} is instance-local: with the state in Postgres several core"
        " instances serve the same satellites, and a blob stored on one instance's disk would"
        " be NOT_FOUND on the others; use a backend every instance reads (database, or s3 with"
        " SPK_S3_*). To move existing blobs, run once on the instance that holds them:"
        " `spk-core storage migrate database --data-dir DIR --database-url URL`"
    )


def save_active_name(name: str) -> None:
    upsert(Setting, key=ACTIVE_KEY, value=json.dumps({"name": name}))


def backend_stats() -> dict[str, tuple[int, int]]:
    """{backend: (blob count, bytes)} from the blob index."""
    query = BlobRecord.select(
        BlobRecord.backend,
        pw.fn.COUNT(BlobRecord.sha256),
        pw.fn.SUM(BlobRecord.size),
    ).group_by(BlobRecord.backend)
    # peewee's stubs type every query as yielding model rows; an aggregate yields tuples.
    rows = cast("Iterable[tuple[str, int, int | None]]", query.tuples())
    return {str(name): (int(count), int(total or 0)) for name, count, total in rows}
