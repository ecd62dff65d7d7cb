"""satellite.store.AsyncStore, the adapter between the sync logic and the file-system store.

Its own logic: every call runs in a worker thread, a full disk becomes DiskFull, a batch of
chunks is one write. And the sync logic over it on real files with real wheels, for what only
real files show: links into `pkgs/` repaired in place, nothing half-built left behind.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import satellite.sync
from satellite.store import AsyncStore, SatelliteStore, async_store
from satellite.store.blobs import BlobWriter
from satellite.store.unpack_pool import UnpackPool
from satellite.sync import Outcome, ReconcileDeps, reconcile_to_hash, repair_tree
from shared import tags
from shared.errors import DiskFull
from shared.signing import verify_manifest
from tests.fakes import FakeCore
from tests.test_satellite_store import make_manifest, temp_leftovers, wheel_entry
from tests.wheelfactory import WheelSpec

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/state.json")


@pytest.fixture
def store(tmp_path: Path) -> AsyncStore:
    return AsyncStore(SatelliteStore(tmp_path / "data"))


def _deps(store: AsyncStore, core: FakeCore) -> ReconcileDeps:
    return ReconcileDeps(
        pkgs=store,
        trees=store,
        state=store,
        core=core,
        verify_manifest=functools.partial(verify_manifest, public=core.key.public_key()),
        unsupported_wheels=tags.unsupported_wheels,
        describe_interpreter=tags.describe_interpreter,
        unpack_concurrency=2,
    )


async def test_store_calls_run_in_worker_threads(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []

    def has_blob(sha256: str) -> bool:
        threads.append(threading.get_ident())
        return False

    monkeypatch.setattr(store.disk, "has_blob", has_blob)
    assert not await store.has_blob("a" * 64)
    assert threads and threads[0] != threading.get_ident()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_a_full_disk_becomes_disk_full(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    full = OSError(code, os.strerror(code), "/data/state.json")

    def save_state(*args: object) -> None:
        raise full

    monkeypatch.setattr(store.disk, "save_state", save_state)
    with pytest.raises(DiskFull) as caught:
        await store.save_state(await store.load_state())
    assert str(caught.value) == str(full) and caught.value.__cause__ is full


async def test_a_full_disk_while_writing_a_blob_becomes_disk_full(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write(self: BlobWriter, chunk: bytes) -> None:
        raise ENOSPC

    sink = await store.open_blob("a" * 64, 10)
    monkeypatch.setattr(BlobWriter, "write", write)
    try:
        with pytest.raises(DiskFull, match="No space left on device"):
            await sink.write([b"12345"])
    finally:
        sink.close()


async def test_other_os_errors_pass_through(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    denied = OSError(errno.EACCES, "Permission denied")

    def current_hash() -> str | None:
        raise denied

    monkeypatch.setattr(store.disk, "current_hash", current_hash)
    with pytest.raises(OSError) as caught:
        await store.current_hash()
    assert caught.value is denied


async def test_a_batch_is_written_chunk_by_chunk_and_committed(store: AsyncStore) -> None:
    data = os.urandom(3000)
    sha = hashlib.sha256(data).hexdigest()
    sink = await store.open_blob(sha, len(data))
    try:
        await sink.write([data[:1000], data[1000:2500]])
        await sink.write([data[2500:]])
        await sink.commit()
    finally:
        sink.close()
    assert await store.has_blob(sha)
    assert store.disk.blob_path(sha).read_bytes() == data


async def test_a_foreign_staged_token_is_refused(store: AsyncStore) -> None:
    class Foreign:
        sha256 = "a" * 64

    with pytest.raises(TypeError, match="not staged by this store"):
        await store.publish_pkgs([Foreign()])


async def test_reconcile_and_repair_on_real_files(store: AsyncStore, tmp_path: Path) -> None:
    core = FakeCore(Ed25519PrivateKey.generate())
    built = [wheel_entry(tmp_path / "w", WheelSpec(n, "1.0")) for n in ("alpha", "beta")]
    manifest = core.publish(make_manifest([e for e, _ in built]), {e.sha256: d for e, d in built})
    deps = _deps(store, core)
    result = await reconcile_to_hash(manifest.lockfile_hash, deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    disk = store.disk
    assert disk.current_hash() == manifest.lockfile_hash
    assert disk.load_state().highest_sequence == 1
    assert temp_leftovers(disk.root) == []

    target = disk.tree_site(manifest.lockfile_hash) / "alpha" / "__init__.py"
    target.chmod(0o644)
    target.write_text("HACKED = True\n")  # through the link: pkgs/ is damaged too
    assert (await repair_tree(manifest.lockfile_hash, deps)).outcome is Outcome.REPAIRED
    assert disk.verify_tree(manifest.lockfile_hash) == []
    assert disk.verify_pkg(built[0][0].sha256) == []
    assert "NAME = 'alpha'" in target.read_text()
    assert len(core.downloads) == 2  # the repair was offline


async def test_a_refused_blob_leaves_nothing_half_built(store: AsyncStore, tmp_path: Path) -> None:
    core = FakeCore(Ed25519PrivateKey.generate())
    good, bad = (wheel_entry(tmp_path / "w", WheelSpec(n, "1.0")) for n in ("alpha", "beta"))
    manifest = make_manifest([good[0], bad[0]])
    core.publish(manifest, {good[0].sha256: good[1], bad[0].sha256: bad[1][:-5] + b"XXXXX"})
    result = await reconcile_to_hash(manifest.lockfile_hash, _deps(store, core))
    assert result.outcome is Outcome.FAILED and "sha256 mismatch" in result.error
    disk = store.disk
    assert disk.current_hash() is None and not disk.has_tree(manifest.lockfile_hash)
    assert disk.has_pkg(good[0].sha256)  # published although its sibling failed
    assert not disk.has_blob(bad[0].sha256) and disk.partial_offset(bad[0].sha256) == 0
    assert temp_leftovers(disk.root) == []


@pytest.mark.parametrize(("spawn_min", "processes"), [(10**12, False), (0, True)])
async def test_a_small_sync_unpacks_in_threads_and_a_big_one_starts_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn_min: int, processes: bool
) -> None:
    monkeypatch.setattr(async_store, "SPAWN_MIN_BYTES", spawn_min)
    pool = UnpackPool(2)
    try:
        store = AsyncStore(SatelliteStore(tmp_path / "data"), unpacker=pool)
        core = FakeCore(Ed25519PrivateKey.generate())
        built = [wheel_entry(tmp_path / "w", WheelSpec(n, "1.0")) for n in ("alpha", "beta")]
        manifest = core.publish(
            make_manifest([e for e, _ in built]), {e.sha256: d for e, d in built}
        )
        result = await reconcile_to_hash(manifest.lockfile_hash, _deps(store, core))
        assert result.outcome is Outcome.FLIPPED, result.error
        assert pool.running is processes  # no process start for a few small wheels
        assert store.disk.verify_tree(manifest.lockfile_hash) == []
    finally:
        pool.close()


def test_the_sync_logic_leaves_threads_to_the_adapter() -> None:
    """import-linter keeps files and sockets out of satellite/sync; this keeps threads out."""
    package = Path(satellite.sync.__file__).parent
    for module in sorted(package.glob("*.py")):
        source = module.read_text()
        for word in ("to_thread", "run_in_executor", "threading"):
            assert word not in source, f"{module.name} uses {word}: that is AsyncStore's job"
