"""The reconciler and its coalescing worker, pure: over in-memory fakes of the core and the store.

tests/fakes.py holds the fakes (FakeCore with real Ed25519 signatures, MemoryStore keeping the
store's rules). These tests never touch the disk: the `_no_disk` fixture below refuses tmp_path
and makes every file-system write fail, so a sync path that bypassed its seams would show here.
The file-system store behind the same seams has real-file tests (tests/test_satellite_*.py,
tests/test_async_store.py).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from satellite.sync import (
    Outcome,
    ReconcileDeps,
    Reconciler,
    ReconcileResult,
    SyncReport,
    SyncStatus,
    reconcile_to_hash,
    repair_tree,
)
from satellite.sync.materialiser import WRITE_BATCH
from shared import tags
from shared.manifest import Manifest, ManifestEntry
from shared.signing import sign_manifest, verify_manifest
from tests.fakes import CHUNK, FakeCore, FakeUrls, MemoryStore, fake_package, manifest_of

_WRITES = ("mkdir", "makedirs", "rename", "replace", "symlink", "link", "unlink", "rmdir")


@pytest.fixture(autouse=True)
def _no_disk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pure tests: no temp dirs, and any write to the file system fails the test."""
    assert not {"tmp_path", "tmp_path_factory", "tmpdir"} & set(request.fixturenames)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the sync logic touched the disk: {args!r}")

    real_open = builtins.open

    def read_only_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            refuse(file, mode)
        return real_open(file, mode, *args, **kwargs)

    for name in _WRITES:
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(shutil, "rmtree", refuse)
    monkeypatch.setattr(builtins, "open", read_only_open)
    yield


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class World:
    store: MemoryStore
    core: FakeCore
    clock: Clock
    deps: ReconcileDeps

    def package(
        self, name: str, version: str, size: int = 2000, tag: str = "py3-none-any"
    ) -> tuple[ManifestEntry, bytes]:
        return fake_package(name, version, size, tag)

    def publish(self, *packages: tuple[ManifestEntry, bytes], sequence: int = 1) -> Manifest:
        manifest = manifest_of([e for e, _ in packages], sequence=sequence)
        return self.core.publish(manifest, {e.sha256: d for e, d in packages})

    def statuses(self) -> list[tuple[str, SyncStatus]]:
        return [(r.lockfile_hash[:8], r.status) for r in self.core.reports]


@pytest.fixture
def world() -> World:
    key = Ed25519PrivateKey.generate()
    store = MemoryStore()
    core = FakeCore(key)
    clock = Clock()
    deps = ReconcileDeps(
        pkgs=store,
        trees=store,
        state=store,
        core=core,
        verify_manifest=functools.partial(verify_manifest, public=key.public_key()),
        unsupported_wheels=tags.unsupported_wheels,
        describe_interpreter=tags.describe_interpreter,
        unpack_concurrency=2,
        wall_clock=clock,
    )
    return World(store, core, clock, deps)


async def test_first_reconcile_pulls_unpacks_assembles_and_flips(world: World) -> None:
    a, b = world.package("alpha", "1.0"), world.package("beta", "2.0")
    manifest = world.publish(a, b)
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert (result.blobs_pulled, result.pkgs_unpacked, result.tree_built) == (2, 2, True)
    assert result.bytes_pulled == a[0].size + b[0].size
    assert world.store.current == manifest.lockfile_hash
    assert world.store.published == [2]  # both packages behind one durability sync
    assert [r.status for r in world.core.reports] == [SyncStatus.SYNCING, SyncStatus.READY]
    ready = world.core.reports[-1]
    assert (ready.blobs_pulled, ready.bytes_pulled) == (2, result.bytes_pulled)
    assert ready.current_hash == manifest.lockfile_hash
    state = world.store.state
    assert (state.desired_hash, state.status, state.error) == (manifest.lockfile_hash, "ready", "")
    assert state.highest_sequence == 1

    again = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert again.outcome is Outcome.ALREADY_CURRENT
    assert (again.blobs_pulled, again.bytes_pulled) == (0, 0)
    assert len(world.core.downloads) == 2
    assert world.core.manifest_calls == [manifest.lockfile_hash]  # no-op: not even the manifest
    assert world.core.reports[-1].status is SyncStatus.READY


async def test_blob_bytes_reach_the_store_in_batches(world: World) -> None:
    big = world.package("big", "1.0", size=2 * WRITE_BATCH + 12345)
    manifest = world.publish(big)
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    # ~2,000 chunks from the core, three writes into the store (each may be a thread hop).
    assert world.store.writes == [WRITE_BATCH, WRITE_BATCH, 12345]
    assert world.store.calls.count("missing_pkgs") == 1  # one look for the whole manifest


async def test_delta_pulls_exactly_the_new_blob(world: World) -> None:
    a, b, c = world.package("alpha", "1.0"), world.package("beta", "2.0"), world.package("c", "1")
    first = world.publish(a, b)
    await reconcile_to_hash(first.lockfile_hash, world.deps)
    second = world.publish(a, b, c, sequence=2)
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED
    assert (result.blobs_pulled, result.bytes_pulled, result.pkgs_unpacked) == (1, c[0].size, 1)
    assert world.core.downloads[-1] == (c[0].sha256, 0)
    assert world.store.trees[first.lockfile_hash].retired_at == world.clock.now


async def test_a_partial_download_is_resumed_from_its_offset(world: World) -> None:
    a = world.package("alpha", "1.0", size=51200)
    manifest = world.publish(a)
    half = a[0].size // 2
    world.store.partials[a[0].sha256] = a[1][:half]  # a dropped stream's bytes
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert world.core.downloads == [(a[0].sha256, half)]
    assert result.bytes_pulled == a[0].size - half


async def test_a_rotten_partial_is_downloaded_again_from_zero(world: World) -> None:
    a = world.package("alpha", "1.0")
    manifest = world.publish(a)
    world.store.partials[a[0].sha256] = b"\0" * 100
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
    assert world.store.current == first.lockfile_hash
    assert second.lockfile_hash not in world.store.trees
    assert b[0].sha256 not in world.store.blobs
    assert b[0].sha256 not in world.store.partials
    assert world.store.staging == set()  # nothing left half-built
    report = world.core.reports[-1]
    assert (report.status, report.error) == (SyncStatus.ERROR, result.error)
    assert report.current_hash == first.lockfile_hash
    state = world.store.state
    assert (state.desired_hash, state.status) == (second.lockfile_hash, "error")


async def test_a_rotten_blob_on_disk_is_pulled_again(world: World) -> None:
    a = world.package("alpha", "1.0")
    manifest = world.publish(a)
    rotten = bytearray(a[1])
    rotten[10] ^= 0xFF
    world.store.blobs[a[0].sha256] = bytes(rotten)
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED, result.error
    assert world.core.downloads == [(a[0].sha256, 0)]
    assert world.store.blobs[a[0].sha256] == a[1]


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
        target = world.publish(a, world.package("beta", "1.0", tag="cp27-cp27m-win32"), sequence=7)
    downloads = len(world.core.downloads)
    result = await reconcile_to_hash(target.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FAILED
    assert expected in result.error
    if problem == "wrong-tags":
        assert "resolved for cp3.11" in result.error and "this satellite runs cp311" in result.error
    assert len(world.core.downloads) == downloads  # nothing pulled for a refused manifest
    assert world.store.current == base.lockfile_hash


async def test_nothing_desired_touches_nothing(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    for empty in (None, ""):
        result = await reconcile_to_hash(empty, world.deps)
        assert result.outcome is Outcome.NOTHING_DESIRED
    assert world.store.current == manifest.lockfile_hash
    assert world.core.reports[-1] == SyncReport(
        "", SyncStatus.READY, current_hash=manifest.lockfile_hash
    )
    assert world.store.state.desired_hash == ""


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
    assert world.store.tree_hashes() == [second.lockfile_hash]


async def test_drift_repair_rebuilds_the_tree_and_the_damaged_package(world: World) -> None:
    a, b = world.package("alpha", "1.0"), world.package("beta", "2.0")
    manifest = world.publish(a, b)
    await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    world.store.damage_pkg(a[0].sha256)  # a write through the tree's link lands in pkgs/
    repaired = await repair_tree(manifest.lockfile_hash, world.deps)
    assert repaired.outcome is Outcome.REPAIRED and repaired.drift_repair
    assert world.store.calls.count("replace_pkg") == 1  # only the damaged package
    assert await world.store.verify_tree(manifest.lockfile_hash) == []
    assert await world.store.verify_pkg(a[0].sha256) == []
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
    assert world.store.current == h2


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
    assert world.store.current == h2
    assert world.store.tree_hashes() == [h2]  # h1 was never materialised
    assert (h1[:8], SyncStatus.READY) not in world.statuses()


async def test_a_repair_request_goes_through_the_worker(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    results: list[ReconcileResult] = []
    async with Reconciler(world.deps, on_result=results.append) as reconciler:
        reconciler.request(manifest.lockfile_hash)
        await reconciler.wait_idle()
        world.store.damage_tree(manifest.lockfile_hash)  # an intruder file in the tree
        reconciler.request_repair()
        await reconciler.wait_idle()
    outcomes = [r.outcome for r in results]
    assert outcomes == [Outcome.FLIPPED, Outcome.REPAIRED, Outcome.ALREADY_CURRENT]
    assert await world.store.verify_tree(manifest.lockfile_hash) == []


async def test_request_none_reruns_the_current_target(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    async with Reconciler(world.deps) as reconciler:
        reconciler.request(None)  # nothing requested yet: nothing to do, nothing recorded
        assert await reconciler.wait_idle() is None
        reconciler.request(manifest.lockfile_hash)
        await reconciler.wait_idle()
        world.store.current = None  # `current` broken by hand
        reconciler.request(None)
        result = await reconciler.wait_idle()
    assert result is not None and result.outcome is Outcome.FLIPPED
    assert reconciler.desired == manifest.lockfile_hash
    assert world.store.current == manifest.lockfile_hash


async def test_a_dead_worker_is_raised_not_waited_for(world: World) -> None:
    manifest = world.publish(world.package("alpha", "1.0"))
    world.store.fail["current_hash"] = RuntimeError("the store is gone")
    reconciler = Reconciler(world.deps)
    reconciler.start()
    reconciler.request(manifest.lockfile_hash)
    with pytest.raises(RuntimeError, match="the store is gone"):
        await reconciler.wait_idle()
    with pytest.raises(RuntimeError, match="the store is gone"):
        await reconciler.shutdown()  # re-raised, never lost
    await reconciler.shutdown()  # idempotent


# --------------------------------------------------------------------------- blob URLs


def _with_urls(world: World, base: str = "") -> FakeUrls:
    urls = FakeUrls()
    world.deps = dataclasses.replace(world.deps, urls=urls, blob_base_url=base)
    return urls


async def test_blobs_with_a_url_skip_the_core_and_are_verified_the_same(world: World) -> None:
    urls = _with_urls(world)
    a, b = world.package("alpha", "1.0", size=3 * CHUNK), world.package("beta", "1.0")
    manifest = world.publish(a, b)
    url = f"https://bucket.example/blobs/{a[0].sha256}?X-Amz-Signature=secret"
    world.core.locations[a[0].sha256] = url
    urls.content[url] = a[1]
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED and result.blobs_pulled == 2
    assert len(world.core.location_calls) == 1  # one question for the whole sync
    assert set(world.core.location_calls[0]) == {a[0].sha256, b[0].sha256}
    assert [s for s, _ in world.core.downloads] == [b[0].sha256]  # only beta via the core
    assert urls.fetches == [(url, 0)]


async def test_a_failing_url_falls_back_to_the_core_after_the_bytes_that_arrived(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    urls = _with_urls(world)
    a = world.package("alpha", "1.0", size=8 * CHUNK)
    manifest = world.publish(a)
    url = f"https://cdn.example/{a[0].sha256[:2]}/{a[0].sha256}.whl?token=secret"
    world.core.locations[a[0].sha256] = url
    urls.content[url] = a[1]
    urls.broken[url] = 3 * CHUNK  # the CDN drops the connection after 3 chunks
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED
    assert world.core.downloads == [(a[0].sha256, 3 * CHUNK)]  # resumed, nothing sent twice
    assert "falling back to the core" in caplog.text and "https://cdn.example" in caplog.text
    assert "secret" not in caplog.text  # a presigned query never reaches a log line


async def test_a_lying_url_is_refused_by_the_hash_and_the_core_serves_the_blob(
    world: World,
) -> None:
    urls = _with_urls(world)
    a = world.package("alpha", "1.0", size=2 * CHUNK)
    manifest = world.publish(a)
    url = "https://evil.example/x.whl"
    world.core.locations[a[0].sha256] = url
    urls.content[url] = bytes(len(a[1]))  # same size, other bytes
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED
    # The partial failed verification, so it was dropped and the core sent the whole blob.
    assert world.core.downloads == [(a[0].sha256, 0)]


async def test_a_host_mirror_needs_no_question_to_the_core(world: World) -> None:
    urls = _with_urls(world, base="http://mirror.local/blobs/")
    a = world.package("alpha", "1.0")
    manifest = world.publish(a)
    url = f"http://mirror.local/blobs/{a[0].sha256[:2]}/{a[0].sha256}.whl"
    urls.content[url] = a[1]
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.outcome is Outcome.FLIPPED
    assert world.core.location_calls == [] and world.core.downloads == []
