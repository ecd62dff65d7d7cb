"""The reconciler and its coalescing worker, over the real store and a hand-written fake core.

The fake core is a dict of signed manifests and blob bytes (the one thing we do not own here is
the gRPC transport, covered by the client's own tests); signatures are real Ed25519.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from satellite.ports import SyncReport, SyncStatus
from satellite.reconciler import (
    Outcome,
    ReconcileDeps,
    Reconciler,
    ReconcileResult,
    reconcile_to_hash,
    repair_tree,
)
from satellite.store import SatelliteStore
from shared.errors import NotFound
from shared.manifest import Manifest, ManifestEntry
from shared.signing import sign_manifest, verify_manifest
from tests.test_satellite_store import make_manifest, temp_leftovers, wheel_entry
from tests.wheelfactory import WheelSpec

CHUNK = 4096


class FakeCore:
    """CoreClient over dicts; records every call so tests can count what was pulled."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.manifests: dict[str, Manifest] = {}
        self.blobs: dict[str, bytes] = {}
        self.reports: list[SyncReport] = []
        self.manifest_calls: list[str] = []
        self.downloads: list[tuple[str, int]] = []
        self.gates: dict[str, asyncio.Event] = {}  # hash -> released when set
        self.asked: dict[str, asyncio.Event] = {}

    def publish(self, manifest: Manifest, blobs: dict[str, bytes]) -> Manifest:
        signed = sign_manifest(manifest, self.key)
        self.manifests[signed.lockfile_hash] = signed
        self.blobs.update(blobs)
        return signed

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        self.manifest_calls.append(lockfile_hash)
        self.asked.setdefault(lockfile_hash, asyncio.Event()).set()
        if lockfile_hash in self.gates:
            await self.gates[lockfile_hash].wait()
        if lockfile_hash not in self.manifests:
            raise NotFound(f"manifest {lockfile_hash} is unknown to the core")
        return self.manifests[lockfile_hash]

    async def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        self.downloads.append((sha256, offset))
        if sha256 not in self.blobs:
            raise NotFound(f"blob {sha256} is unknown to the core")
        data = self.blobs[sha256]
        for start in range(offset, len(data), CHUNK):
            yield data[start : start + CHUNK]

    async def report(self, report: SyncReport) -> None:
        self.reports.append(report)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class World:
    store: SatelliteStore
    core: FakeCore
    clock: Clock
    deps: ReconcileDeps
    wheels: Path

    def package(self, name: str, version: str, **files: bytes) -> tuple[ManifestEntry, bytes]:
        spec = WheelSpec(name, version, files={k.replace("__", "/"): v for k, v in files.items()})
        return wheel_entry(self.wheels, spec)

    def publish(self, *packages: tuple[ManifestEntry, bytes], sequence: int = 1) -> Manifest:
        manifest = make_manifest([e for e, _ in packages], sequence=sequence)
        return self.core.publish(manifest, {e.sha256: d for e, d in packages})

    def statuses(self) -> list[tuple[str, SyncStatus]]:
        return [(r.lockfile_hash[:8], r.status) for r in self.core.reports]


@pytest.fixture
def world(tmp_path: Path) -> World:
    key = Ed25519PrivateKey.generate()
    store = SatelliteStore(tmp_path / "data")
    core = FakeCore(key)
    clock = Clock()
    deps = ReconcileDeps(
        store=store,
        core=core,
        verify_manifest=functools.partial(verify_manifest, public=key.public_key()),
        wall_clock=clock,
    )
    return World(store, core, clock, deps, tmp_path / "wheels")


async def test_first_reconcile_pulls_unpacks_assembles_and_flips(world: World) -> None:
    a, b = world.package("alpha", "1.0"), world.package("beta", "2.0")
    manifest = world.publish(a, b)
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert (result.blobs_pulled, result.pkgs_unpacked, result.tree_built) == (2, 2, True)
    assert result.bytes_pulled == a[0].size + b[0].size
    assert world.store.current_hash() == manifest.lockfile_hash
    assert [r.status for r in world.core.reports] == [SyncStatus.SYNCING, SyncStatus.READY]
    ready = world.core.reports[-1]
    assert (ready.blobs_pulled, ready.bytes_pulled) == (2, result.bytes_pulled)
    assert ready.current_hash == manifest.lockfile_hash
    state = world.store.load_state()
    assert (state.desired_hash, state.status, state.error) == (manifest.lockfile_hash, "ready", "")
    assert state.highest_sequence == 1

    again = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert again.outcome is Outcome.ALREADY_CURRENT
    assert (again.blobs_pulled, again.bytes_pulled) == (0, 0)
    assert len(world.core.downloads) == 2
    assert world.core.manifest_calls == [manifest.lockfile_hash]  # no-op: not even the manifest
    assert world.core.reports[-1].status is SyncStatus.READY


async def test_delta_pulls_exactly_the_new_blob(world: World) -> None:
    a, b, c = world.package("alpha", "1.0"), world.package("beta", "2.0"), world.package("c", "1")
    first = world.publish(a, b)
    await reconcile_to_hash(first.lockfile_hash, world.deps)
    second = world.publish(a, b, c, sequence=2)
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED
    assert (result.blobs_pulled, result.bytes_pulled, result.pkgs_unpacked) == (1, c[0].size, 1)
    assert world.core.downloads[-1] == (c[0].sha256, 0)
    assert world.store.trees.retired_at(first.lockfile_hash) == world.clock.now


async def test_a_partial_download_is_resumed_from_its_offset(world: World) -> None:
    a = world.package("alpha", "1.0", alpha__data=bytes(range(256)) * 200)
    manifest = world.publish(a)
    half = a[0].size // 2
    writer = world.store.open_blob_writer(a[0].sha256, a[0].size)
    writer.write(a[1][:half])
    writer.close()
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert world.core.downloads == [(a[0].sha256, half)]
    assert result.bytes_pulled == a[0].size - half


async def test_a_rotten_partial_is_downloaded_again_from_zero(world: World) -> None:
    a = world.package("alpha", "1.0")
    manifest = world.publish(a)
    writer = world.store.open_blob_writer(a[0].sha256, a[0].size)
    writer.write(b"\0" * 100)
    writer.close()
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert world.core.downloads == [(a[0].sha256, 100), (a[0].sha256, 0)]


async def test_corrupted_blob_fails_and_leaves_current_alone(world: World) -> None:
    a, b = world.package("alpha", "1.0"), world.package("beta", "2.0")
    first = world.publish(a)
    await reconcile_to_hash(first.lockfile_hash, world.deps)
    second = world.publish(a, b, sequence=2)
    world.core.blobs[b[0].sha256] = b[1][:-5] + b"XXXXX"  # the core serves bad bytes
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FAILED
    assert "beta 2.0 (beta-2.0-py3-none-any.whl" in result.error
    assert f"blob {b[0].sha256}: sha256 mismatch" in result.error
    assert world.store.current_hash() == first.lockfile_hash
    assert not world.store.has_tree(second.lockfile_hash)
    assert not world.store.has_blob(b[0].sha256)
    assert world.store.partial_offset(b[0].sha256) == 0
    assert temp_leftovers(world.store.root) == []
    report = world.core.reports[-1]
    assert (report.status, report.error) == (SyncStatus.ERROR, result.error)
    assert report.current_hash == first.lockfile_hash
    state = world.store.load_state()
    assert (state.desired_hash, state.status) == (second.lockfile_hash, "error")


async def test_a_rotten_blob_on_disk_is_pulled_again(world: World) -> None:
    a = world.package("alpha", "1.0")
    manifest = world.publish(a)
    writer = world.store.open_blob_writer(a[0].sha256, a[0].size)
    writer.write(a[1])
    writer.commit()
    path = world.store.blob_path(a[0].sha256)
    rotten = bytearray(path.read_bytes())
    rotten[10] ^= 0xFF
    path.write_bytes(bytes(rotten))
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert world.core.downloads == [(a[0].sha256, 0)]


@pytest.mark.parametrize("problem", ["unknown", "badly-signed", "rolled-back", "wrong-tags"])
async def test_refused_manifests(world: World, problem: str) -> None:
    a = world.package("alpha", "1.0")
    base = world.publish(a, sequence=5)
    await reconcile_to_hash(base.lockfile_hash, world.deps)
    b = world.package("beta", "1.0")
    target = world.publish(a, b, sequence=6)
    expected = {
        "unknown": "unknown to the core",
        "badly-signed": "refusing it",
        "rolled-back": "sequence 4, below the highest this satellite accepted (5)",
        "wrong-tags": "cannot be installed on this satellite: beta-1.0-cp27-cp27m-win32.whl",
    }[problem]
    if problem == "unknown":
        target = dataclasses.replace(target, lockfile_hash="f" * 64)
    elif problem == "badly-signed":
        forged = sign_manifest(target, Ed25519PrivateKey.generate())
        world.core.manifests[target.lockfile_hash] = forged
    elif problem == "rolled-back":
        target = world.publish(a, b, sequence=4)
    else:
        spec = WheelSpec("beta", "1.0", tag="cp27-cp27m-win32")
        target = world.publish(a, wheel_entry(world.wheels, spec), sequence=7)
    downloads = len(world.core.downloads)
    result = await reconcile_to_hash(target.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FAILED
    assert expected in result.error
    if problem == "wrong-tags":
        assert "resolved for cp3.11" in result.error and "this satellite runs cp311" in result.error
    assert len(world.core.downloads) == downloads  # nothing pulled for a refused manifest
    assert world.store.current_hash() == base.lockfile_hash


async def test_nothing_desired_touches_nothing(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    for empty in (None, ""):
        result = await reconcile_to_hash(empty, world.deps)
        assert result.outcome is Outcome.NOTHING_DESIRED
    assert world.store.current_hash() == manifest.lockfile_hash
    assert world.core.reports[-1] == SyncReport(
        "", SyncStatus.READY, current_hash=manifest.lockfile_hash
    )
    assert world.store.load_state().desired_hash == ""


async def test_old_trees_are_collected_after_the_grace(world: World) -> None:
    first = world.publish(world.package("alpha", "1.0"))
    second = world.publish(world.package("alpha", "2.0"), sequence=2)
    await reconcile_to_hash(first.lockfile_hash, world.deps)
    await reconcile_to_hash(second.lockfile_hash, world.deps)
    world.clock.now += world.deps.tree_grace_seconds - 1
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.trees_collected == ()
    world.clock.now += 2
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.trees_collected == (first.lockfile_hash,)
    assert world.store.has_tree(second.lockfile_hash)


async def test_drift_repair_rebuilds_the_tree_and_the_damaged_package(world: World) -> None:
    a, b = world.package("alpha", "1.0"), world.package("beta", "2.0")
    manifest = world.publish(a, b)
    await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    site = world.store.tree_site(manifest.lockfile_hash)
    target = site / "alpha" / "__init__.py"
    target.chmod(0o644)
    target.write_text("HACKED = True\n")  # through the hard link: pkgs/ is damaged too
    assert (await repair_tree(manifest.lockfile_hash, world.deps)).outcome is Outcome.REPAIRED
    assert world.store.verify_tree(manifest.lockfile_hash) == []
    assert world.store.verify_pkg(a[0].sha256) == []
    assert "NAME = 'alpha'" in target.read_text()
    assert (await repair_tree(manifest.lockfile_hash, world.deps)).outcome is Outcome.INTACT
    assert len(world.core.downloads) == 2  # the first reconcile's; the repair was offline


async def test_requests_coalesce_to_the_newest_hash(world: World) -> None:
    h1 = world.publish(world.package("alpha", "1.0")).lockfile_hash
    h2 = world.publish(world.package("alpha", "2.0"), sequence=2).lockfile_hash
    async with Reconciler(world.deps) as reconciler:
        reconciler.request(h1)
        reconciler.request(h2)  # before the worker even woke up
        result = await reconciler.wait_idle()
    assert result is not None and result.outcome is Outcome.FLIPPED
    assert world.core.manifest_calls == [h2]
    assert world.store.current_hash() == h2


async def test_a_superseded_reconcile_never_flips(world: World) -> None:
    h1 = world.publish(world.package("alpha", "1.0")).lockfile_hash
    h2 = world.publish(world.package("alpha", "2.0"), sequence=2).lockfile_hash
    world.core.gates[h1] = asyncio.Event()
    world.core.asked[h1] = asyncio.Event()
    results: list[ReconcileResult] = []
    async with Reconciler(world.deps, on_result=results.append) as reconciler:
        reconciler.request(h1)
        await world.core.asked[h1].wait()  # h1 is in progress
        reconciler.request(h2)
        world.core.gates[h1].set()
        await reconciler.wait_idle()
    assert [r.outcome for r in results] == [Outcome.SUPERSEDED, Outcome.FLIPPED]
    assert world.store.current_hash() == h2
    assert not world.store.has_tree(h1)  # never materialised
    assert world.store.trees.hashes() == [h2]
    assert (h1[:8], SyncStatus.READY) not in world.statuses()


async def test_a_repair_request_goes_through_the_worker(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    results: list[ReconcileResult] = []
    async with Reconciler(world.deps, on_result=results.append) as reconciler:
        reconciler.request(manifest.lockfile_hash)
        await reconciler.wait_idle()
        site = world.store.tree_site(manifest.lockfile_hash)
        site.chmod(0o755)
        (site / "intruder.py").write_text("")
        reconciler.request_repair()
        await reconciler.wait_idle()
    outcomes = [r.outcome for r in results]
    assert outcomes == [Outcome.FLIPPED, Outcome.REPAIRED, Outcome.ALREADY_CURRENT]
    assert world.store.verify_tree(manifest.lockfile_hash) == []


async def test_request_none_reruns_the_current_target(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    async with Reconciler(world.deps) as reconciler:
        reconciler.request(None)  # nothing requested yet: nothing to do, nothing recorded
        assert await reconciler.wait_idle() is None
        reconciler.request(manifest.lockfile_hash)
        await reconciler.wait_idle()
        (world.store.root / "current").unlink()  # broken by hand
        reconciler.request(None)
        result = await reconciler.wait_idle()
    assert result is not None and result.outcome is Outcome.FLIPPED
    assert reconciler.desired == manifest.lockfile_hash
    assert world.store.current_hash() == manifest.lockfile_hash
