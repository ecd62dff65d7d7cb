"""Deltas and grouped publishing in the pure sync logic, over the fakes (tests/fakes.py)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from satellite.sync import (
    Outcome,
    ReconcileDeps,
    Reconciler,
    StoreGcPolicy,
    StoreGcReport,
    reconcile_to_hash,
)
from satellite.sync.link_rate import patch_wait_ms
from satellite.sync.materialiser import PUBLISH_GROUP
from shared import tags
from shared.manifest import Manifest, ManifestEntry
from shared.signing import verify_manifest
from tests.fakes import (
    FakeCore,
    FakeUrls,
    MemoryStore,
    fake_package,
    manifest_of,
    upgraded_package,
)


@dataclasses.dataclass
class World:
    store: MemoryStore
    core: FakeCore
    deps: ReconcileDeps

    def publish(self, *packages: tuple[ManifestEntry, bytes], sequence: int = 1) -> Manifest:
        manifest = manifest_of([e for e, _ in packages], sequence=sequence)
        return self.core.publish(manifest, {e.sha256: d for e, d in packages})


@pytest.fixture
def world() -> World:
    key = Ed25519PrivateKey.generate()
    store, core = MemoryStore(), FakeCore(key)
    deps = ReconcileDeps(
        pkgs=store,
        trees=store,
        state=store,
        core=core,
        verify_manifest=functools.partial(verify_manifest, public=key.public_key()),
        unsupported_wheels=tags.unsupported_wheels,
        describe_interpreter=tags.describe_interpreter,
        unpack_concurrency=2,
        wall_clock=lambda: 1_000_000.0,
    )
    return World(store, core, deps)


async def _upgrade(world: World, corrupt: bool = False, offer: bool = True):  # type: ignore[no-untyped-def]
    old, old_data = fake_package("big", "1.0", size=200_000)
    other = fake_package("small", "1.0")
    first = world.publish((old, old_data), other)
    assert (await reconcile_to_hash(first.lockfile_hash, world.deps)).ok
    new, new_data = upgraded_package(old, old_data, "2.0")
    if offer:
        world.core.offer_patch(old_data, new_data, corrupt=corrupt)
    second = world.publish((new, new_data), other, sequence=2)
    world.core.downloads.clear()
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    return result, old, new


async def test_an_upgrade_pulls_a_patch_and_reports_wire_and_wheel_bytes(world: World) -> None:
    result, old, new = await _upgrade(world)
    assert result.outcome is Outcome.FLIPPED
    offer = world.core.offers[new.sha256]
    # One question for the whole sync: the blob it lacks, and the other version it holds.
    assert world.core.delta_calls[-1] == ([new.sha256], [old.sha256])
    assert world.core.downloads == [(offer.patch_sha256, 0)]  # the patch, never the wheel
    assert (result.blobs_pulled, result.patches_used, result.patch_fallbacks) == (1, 1, 0)
    assert result.bytes_pulled == offer.patch_size < new.size // 50
    assert result.wheel_bytes == new.size
    report = world.core.reports[-1]
    assert (report.bytes_pulled, report.wheel_bytes, report.patches_used) == (
        offer.patch_size,
        new.size,
        1,
    )
    assert world.store.blobs[new.sha256]  # the result, verified against the manifest entry
    assert not world.store.patches  # applied, then gone


async def test_the_wait_for_patches_follows_the_link_this_satellite_measured(
    world: World,
) -> None:
    big, big_data = fake_package("big", "1.0", size=3 * 1024 * 1024)
    first = world.publish((big, big_data))
    assert (await reconcile_to_hash(first.lockfile_hash, world.deps)).ok
    rate = world.store.state.pull_bytes_per_second
    assert rate > 0  # measured on the 3 MiB pull, kept in the agent state
    new, new_data = upgraded_package(big, big_data, "2.0")
    world.core.offer_patch(big_data, new_data)
    second = world.publish((new, new_data), sequence=2)
    assert (await reconcile_to_hash(second.lockfile_hash, world.deps)).ok
    assert world.core.delta_waits == [patch_wait_ms(rate, new.size)]

    # A fixed --delta-wait overrides the measurement.
    newer, newer_data = upgraded_package(new, new_data, "3.0")
    third = world.publish((newer, newer_data), sequence=3)
    fixed = dataclasses.replace(world.deps, delta_wait_seconds=7.0)
    assert (await reconcile_to_hash(third.lockfile_hash, fixed)).ok
    assert world.core.delta_waits[-1] == 7000


async def test_an_agent_that_never_measured_its_link_leaves_the_wait_to_the_core(
    world: World,
) -> None:
    await _upgrade(world)  # 200 kB pulled: too little to measure bandwidth by
    assert world.store.state.pull_bytes_per_second == 0
    assert world.core.delta_waits == [None]


async def test_a_corrupt_patch_falls_back_to_the_whole_wheel_and_says_so(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result, _, new = await _upgrade(world, corrupt=True)
    assert result.outcome is Outcome.FLIPPED
    assert (result.patches_used, result.patch_fallbacks, result.blobs_pulled) == (0, 1, 1)
    assert (new.sha256, 0) in world.core.downloads
    assert result.wheel_bytes == new.size
    assert result.bytes_pulled >= new.size  # the bad patch's bytes crossed the wire too
    assert "falling back to the whole wheel" in caplog.text
    assert world.core.reports[-1].patch_fallbacks == 1


async def test_a_patch_whose_result_does_not_match_falls_back(world: World) -> None:
    old, old_data = fake_package("big", "1.0", size=100_000)
    first = world.publish((old, old_data))
    assert (await reconcile_to_hash(first.lockfile_hash, world.deps)).ok
    new, new_data = upgraded_package(old, old_data, "2.0")
    wrong, _ = upgraded_package(old, old_data, "2.1")
    # A well-formed patch (its own sha256 is right) that produces other bytes than the manifest's.
    offer = world.core.offer_patch(old_data, upgraded_package(old, old_data, "9.9")[1])
    world.core.offers[new.sha256] = dataclasses.replace(offer, target_sha256=new.sha256)
    second = world.publish((new, new_data), sequence=2)
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.ok and result.patch_fallbacks == 1 and result.patches_used == 0
    assert world.store.blobs[new.sha256] == new_data
    assert wrong.sha256 not in world.store.blobs


async def test_an_older_core_without_deltas_gets_asked_once_and_serves_whole_wheels(
    world: World,
) -> None:
    world.core.deltas_unimplemented = True
    result, _, new = await _upgrade(world)
    assert result.ok and result.patches_used == 0 and result.patch_fallbacks == 0
    assert world.core.downloads == [(new.sha256, 0)]
    assert len(world.core.delta_calls) == 1  # only the upgrade had a base to offer


async def test_deltas_off_never_asks(world: World) -> None:
    world.deps = dataclasses.replace(world.deps, deltas=False)
    result, _, new = await _upgrade(world)
    assert result.ok and result.patches_used == 0
    assert world.core.delta_calls == []
    assert world.core.downloads == [(new.sha256, 0)]


async def test_a_patch_needing_a_larger_window_than_allowed_is_not_used(world: World) -> None:
    world.deps = dataclasses.replace(world.deps, max_window_log=10)
    result, _, new = await _upgrade(world)
    assert result.ok and result.patches_used == 0 and result.patch_fallbacks == 0
    assert world.core.downloads == [(new.sha256, 0)]


async def test_staged_packages_are_published_in_groups(world: World) -> None:
    count = 2 * PUBLISH_GROUP + 5
    packages = [fake_package(f"p{i}", "1.0", size=500) for i in range(count)]
    manifest = world.publish(*packages)
    result = await reconcile_to_hash(manifest.lockfile_hash, world.deps)
    assert result.ok and result.pkgs_unpacked == count
    # A kill during the batch loses at most the group in flight, not every staged package.
    assert world.store.published == [PUBLISH_GROUP, PUBLISH_GROUP, 5]


async def test_store_gc_after_the_flip_keeps_the_previous_version_as_a_base(
    world: World,
) -> None:
    old, old_data = fake_package("big", "1.0", size=50_000)
    gone, _ = fake_package("dropped", "1.0")
    first = world.publish((old, old_data), (gone, _))
    assert (await reconcile_to_hash(first.lockfile_hash, world.deps)).ok
    new, new_data = upgraded_package(old, old_data, "2.0")
    world.deps = dataclasses.replace(world.deps, tree_grace_seconds=0)
    second = world.publish((new, new_data), sequence=2)
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.ok and result.store_gc is not None
    assert world.store.store_gc_calls == [StoreGcPolicy()] * 2  # after each flip
    assert old.sha256 in world.store.blobs  # the delta base for the next upgrade
    assert old.sha256 not in world.store.pkgs  # but no tree needs it unpacked
    assert gone.sha256 not in world.store.blobs  # a distribution no tree uses any more


async def test_a_scheduled_store_gc_pass_is_told_to_its_callback(world: World) -> None:
    old, old_data = fake_package("big", "1.0", size=50_000)
    first = world.publish((old, old_data))
    reports: list[StoreGcReport] = []
    async with Reconciler(world.deps, on_store_gc=reports.append) as reconciler:
        reconciler.request(first.lockfile_hash)
        flipped = await reconciler.wait_idle()
        assert flipped is not None and flipped.store_gc is not None  # in the result, not here
        assert reports == []
        reconciler.request_gc(store=True)  # the agent's hourly timer
        await reconciler.wait_idle()
        reconciler.request_gc()  # tree GC only: no store pass, nothing told
        await reconciler.wait_idle()
    assert len(reports) == 1 and world.store.store_gc_calls == [StoreGcPolicy()] * 2


async def test_a_patch_with_a_url_comes_from_it_and_the_wheel_keeps_its_url(world: World) -> None:
    urls = FakeUrls()
    world.deps = dataclasses.replace(world.deps, urls=urls)
    old, old_data = fake_package("big", "1.0", size=100_000)
    first = world.publish((old, old_data))
    assert (await reconcile_to_hash(first.lockfile_hash, world.deps)).ok
    new, new_data = upgraded_package(old, old_data, "2.0")
    offer = world.core.offer_patch(old_data, new_data)
    for sha in (offer.patch_sha256, new.sha256):
        world.core.locations[sha] = f"https://cdn.example/{sha}"
        urls.content[f"https://cdn.example/{sha}"] = world.core.blobs.get(sha, new_data)
    second = world.publish((new, new_data), sequence=2)
    world.core.downloads.clear()
    result = await reconcile_to_hash(second.lockfile_hash, world.deps)
    assert result.ok and result.patches_used == 1 and result.blobs_by_url == 1
    assert urls.fetches == [(f"https://cdn.example/{offer.patch_sha256}", 0)]
    assert world.core.downloads == []  # nothing through the core
    # One GetBlobLocations for the patch and the wheel (the fallback's URL), after GetDeltas.
    assert sorted(world.core.location_calls[-1]) == sorted([new.sha256, offer.patch_sha256])
