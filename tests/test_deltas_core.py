"""Binary deltas at the core: the zstd patch format, which patch serves which blob (pure), GC of
patches (pure), and the DeltaService over a real database and filesystem store."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest

from core.api.metrics import CoreMetrics
from core.state import patches, releases
from core.state.db import BLOB_PATCH, BlobRecord, DeltaPatch, database_proxy
from core.state.patches import READY, USELESS, PatchRow, WheelRef
from core.storage.delta_plan import DeltaPolicy, base_candidates, plan_offers
from core.storage.deltas import DeltaService
from core.storage.gc import BlobAge, BlobGc, GcPolicy, ReleaseBlobs, plan_gc
from shared.manifest import Manifest, ManifestEntry
from shared.zstd_patch import PatchError, apply_patch, make_patch, window_log_for
from tests.storage_env import ENV, StorageEnv

# ---- the patch format ----

BASE = os.urandom(300_000)
TARGET = BASE[:100_000] + b"a new function\n" * 200 + BASE[100_000:]


def _apply(base: bytes, patch: bytes, **kw: int) -> bytes:
    out: list[bytes] = []
    chunks = [patch[i : i + 7000] for i in range(0, len(patch), 7000)]
    apply_patch(base, chunks, out.append, **kw)
    return b"".join(out)


def test_a_patch_is_small_and_reproduces_the_target() -> None:
    patch, window_log = make_patch(BASE, TARGET, level=19)
    assert len(patch) < len(TARGET) // 20
    assert window_log == window_log_for(len(BASE), len(TARGET)) == 20
    assert _apply(BASE, patch) == TARGET


def test_patch_failures_are_patch_errors() -> None:
    patch, _ = make_patch(BASE, TARGET, level=3)
    with pytest.raises(PatchError, match="truncated"):
        _apply(BASE, patch[:-10])
    with pytest.raises(PatchError, match="after the end"):
        _apply(BASE, patch + b"junk")
    with pytest.raises(PatchError):  # a window above the decoder's bound
        _apply(BASE, patch, max_window_log=15)
    with pytest.raises(PatchError, match="more than the expected"):
        _apply(BASE, patch, max_output=len(TARGET) - 1)
    damaged = bytearray(patch)
    damaged[len(damaged) // 2] ^= 0xFF
    # A flipped byte either fails to decode or decodes to other bytes: never the target.
    with contextlib.suppress(PatchError):
        assert _apply(BASE, bytes(damaged)) != TARGET
    wrong_base = os.urandom(len(BASE))
    with contextlib.suppress(PatchError):
        assert _apply(wrong_base, patch) != TARGET
    with pytest.raises(PatchError, match="window"):
        make_patch(BASE, TARGET, max_window_log=15)


# ---- which patch for which blob (pure) ----


def ref(
    name: str, version: str, sha: str, size: int = 1000, tags: str = "py3-none-any"
) -> WheelRef:
    return WheelRef(sha, name, version, tags, size, f"{name}-{version}-{tags}.whl")


def row(target: str, base: str, status: str = READY, size: int = 100, of: int = 1000) -> PatchRow:
    return PatchRow(target, base, status, f"p-{base}-{target}", size, of, 20)


def test_candidates_are_the_same_distribution_and_tags_nearest_older_first() -> None:
    target = ref("boto", "1.5", "t")
    held = [
        ref("boto", "1.2", "b12"),
        ref("boto", "1.4", "b14"),
        ref("boto", "1.7", "b17"),
        ref("boto", "1.6", "b16"),
        ref("boto", "1.4", "native", tags="cp311-cp311-manylinux_2_17_x86_64"),
        ref("other", "1.4", "o14"),
        ref("boto", "1.5", "t"),  # the target itself
    ]
    assert [w.sha256 for w in base_candidates(target, held)] == ["b14", "b12", "b16", "b17"]


def test_plan_offers_ready_patches_and_schedules_one_computation_per_blob() -> None:
    policy = DeltaPolicy(threshold=0.5)
    wanted = [ref("a", "2", "a2"), ref("b", "2", "b2"), ref("c", "2", "c2"), ref("d", "2", "d2")]
    held = [ref("a", "1", "a1"), ref("b", "1", "b1"), ref("b", "0.9", "b09"), ref("c", "1", "c1")]
    rows = {
        ("a2", "a1"): row("a2", "a1", size=120),  # ready and small: offered
        ("b2", "b1"): row("b2", "b1", USELESS, size=900),  # remembered useless: next base
        ("c2", "c1"): row("c2", "c1", size=600),  # ready but above the threshold
    }
    offers, compute = plan_offers(wanted, held, rows, policy)
    assert [(o.target_sha256, o.base_sha256, o.patch_size) for o in offers] == [("a2", "a1", 120)]
    # b: its nearest base is useless, the next one was never computed; c: nothing else to try;
    # d: holds no other version at all.
    assert [(b.sha256, t.sha256) for b, t in compute] == [("b09", "b2")]
    # A higher threshold offers c's stored patch without recomputing anything.
    offers, _ = plan_offers(wanted, held, rows, DeltaPolicy(threshold=0.7))
    assert {o.target_sha256 for o in offers} == {"a2", "c2"}
    assert plan_offers(wanted, held, rows, DeltaPolicy(enabled=False)) == ([], [])


def test_plan_never_computes_a_pair_beyond_the_window() -> None:
    policy = DeltaPolicy(max_window_log=20)
    big = [ref("a", "2", "a2", size=600_000)]
    held = [ref("a", "1", "a1", size=600_000)]
    assert plan_offers(big, held, {}, policy) == ([], [])


# ---- GC of patches (pure) ----


def test_gc_keeps_a_patch_while_its_target_stays_and_drops_it_with_the_target() -> None:
    history = [ReleaseBlobs(2, ("L2",), frozenset({"new"})), ReleaseBlobs(1, ("L1",), frozenset())]
    day = 86_400
    blobs = [
        BlobAge("new", 10, 0),
        BlobAge("old", 10, 0),  # in no kept release, past grace: goes
        BlobAge("young", 10, 10 * day),  # within grace: stays
        BlobAge("p-new", 5, 0, BLOB_PATCH),  # old, but its target is kept
        BlobAge("p-old", 5, 10 * day, BLOB_PATCH),  # young, but its target goes now
        BlobAge("p-young", 5, 0, BLOB_PATCH),
        BlobAge("p-orphan", 5, 10 * day, BLOB_PATCH),  # its target is not indexed at all
    ]
    targets = {"p-new": "new", "p-old": "old", "p-young": "young", "p-orphan": "gone"}
    plan = plan_gc(2, history, blobs, GcPolicy(keep_previous=0), 10 * day + 1, targets)
    assert sorted(b.sha256 for b in plan.delete) == ["old", "p-old", "p-orphan"]
    assert [b.sha256 for b in plan.within_grace] == ["young"]


# ---- the service over a real database and store ----


def _wheel_entry(name: str, version: str, data: bytes) -> ManifestEntry:
    sha = hashlib.sha256(data).hexdigest()
    return ManifestEntry(name, version, f"{name}-{version}-py3-none-any.whl", sha, len(data), True)


def _computed(metrics: CoreMetrics) -> dict[str, float]:
    """spk_delta_computations_total by result (the service's observer)."""
    return {
        r: metrics.registry.get_sample_value("spk_delta_computations_total", {"result": r}) or 0
        for r in ("ready", "useless", "failed")
    }


def _release(env: StorageEnv, *entries: ManifestEntry) -> int:
    with database_proxy.atomic():
        view, _ = releases.publish_release(
            {"default": Manifest.build(list(entries), ENV)}, env.key, ["default"]
        )
    return view.sequence


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


async def test_service_computes_after_a_publish_offers_and_gc_removes_it(
    tmp_path: Path, database_url: str | None
) -> None:
    env = StorageEnv(tmp_path, database_url)
    old, new = BASE, TARGET
    e1, e2 = _wheel_entry("big", "1.0", old), _wheel_entry("big", "2.0", new)
    for data in (old, new):
        env.add_blob(data, created_at=0)
    service = DeltaService(env.database, env.registry, DeltaPolicy(level=3), tmp_path / "work")
    service.observer = metrics = CoreMetrics()
    try:
        _release(env, e1)
        sequence = _release(env, e2)
        service.after_publish(sequence)
        await service.wait_idle()
        assert _computed(metrics) == {"ready": 1, "useless": 0, "failed": 0}
        rows = list(DeltaPatch.select())
        assert [(r.base_sha256, r.target_sha256, r.status) for r in rows] == [
            (e1.sha256, e2.sha256, READY)
        ]
        patch = rows[0].patch_sha256
        assert BlobRecord.get_by_id(patch).kind == BLOB_PATCH
        with env.registry.open_read(patch) as f:
            assert _apply(old, f.read()) == new
        offers = await service.offers([e2.sha256], [e1.sha256])
        assert [(o.target_sha256, o.base_sha256, o.patch_sha256) for o in offers] == [
            (e2.sha256, e1.sha256, patch)
        ]
        assert offers[0].target_size == len(new)  # what the satellite saves is its difference
        assert _computed(metrics)["ready"] == 1  # offered from the row, not computed again
        # Unknown bases, or a satellite holding nothing of the kind, get nothing.
        assert await service.offers([e2.sha256], ["f" * 64]) == []

        # The target leaves the kept history: GC deletes it and, with it, its patch.
        e3 = _wheel_entry("other", "1.0", b"x" * 100)
        env.add_blob(b"x" * 100, created_at=0)
        _release(env, e3)
        gc = BlobGc(
            env.database, env.lock, env.registry, GcPolicy(keep_previous=0, grace_seconds=0)
        )
        run = await gc.run(dry_run=False)
        assert patch in run.deleted and e2.sha256 in run.deleted
        assert not env.registry.has(patch)
        assert DeltaPatch.select().count() == 0
    finally:
        await service.stop()
        env.database.close()


async def test_service_computes_on_first_request_and_remembers_useless_pairs(
    tmp_path: Path,
) -> None:
    env = StorageEnv(tmp_path)
    a, b = os.urandom(50_000), os.urandom(50_000)  # unrelated: no patch is worth it
    e1, e2 = _wheel_entry("rnd", "1.0", a), _wheel_entry("rnd", "2.0", b)
    for data in (a, b):
        env.add_blob(data, created_at=0)
    service = DeltaService(env.database, env.registry, DeltaPolicy(level=3), tmp_path / "work")
    service.observer = metrics = CoreMetrics()
    try:
        _release(env, e1)
        _release(env, e2)  # no after_publish: the first request computes it
        assert await service.offers([e2.sha256], [e1.sha256]) == []
        stored = DeltaPatch.get()
        assert stored.status == USELESS and "of the wheel" in stored.reason
        assert BlobRecord.select().where(BlobRecord.kind == BLOB_PATCH).count() == 0
        assert await service.offers([e2.sha256], [e1.sha256]) == []  # not computed again
        assert DeltaPatch.select().count() == 1
        assert _computed(metrics) == {"ready": 0, "useless": 1, "failed": 0}
        # Computing it again (another instance did it too, say) replaces the row, no error.
        patches.record(patches.rows_for([e2.sha256])[(e2.sha256, e1.sha256)])
        assert DeltaPatch.select().count() == 1
    finally:
        await service.stop()
        env.database.close()


async def test_a_satellite_bound_of_zero_is_not_kept_waiting_and_the_computation_goes_on(
    tmp_path: Path,
) -> None:
    env = StorageEnv(tmp_path)
    e1, e2 = _wheel_entry("big", "1.0", BASE), _wheel_entry("big", "2.0", TARGET)
    for data in (BASE, TARGET):
        env.add_blob(data, created_at=0)
    service = DeltaService(env.database, env.registry, DeltaPolicy(level=3), tmp_path / "work")
    try:
        _release(env, e1)
        _release(env, e2)
        # A fast link's satellite: whole wheels beat any wait, so none is offered yet ...
        assert await service.offers([e2.sha256], [e1.sha256], max_wait=0) == []
        await service.wait_idle()
        # ... but the computation it started is kept for the next sync (or satellite).
        offers = await service.offers([e2.sha256], [e1.sha256], max_wait=0)
        assert [(o.target_sha256, o.base_sha256) for o in offers] == [(e2.sha256, e1.sha256)]
    finally:
        await service.stop()
        env.database.close()


async def test_a_failed_computation_is_counted_and_not_retried_at_once(tmp_path: Path) -> None:
    env = StorageEnv(tmp_path)
    e1, e2 = _wheel_entry("big", "1.0", BASE), _wheel_entry("big", "2.0", TARGET)
    for data in (BASE, TARGET):
        env.add_blob(data, created_at=0)
    # A rotten copy in the store: the last byte flipped (TARGET ends in a random byte, so
    # writing a fixed one left it intact once in 256 runs).
    env.fs.path_for(e2.sha256).write_bytes(TARGET[:-1] + bytes([TARGET[-1] ^ 0xFF]))
    service = DeltaService(env.database, env.registry, DeltaPolicy(level=3), tmp_path / "work")
    service.observer = metrics = CoreMetrics()
    try:
        _release(env, e1)
        _release(env, e2)
        assert await service.offers([e2.sha256], [e1.sha256]) == []
        assert await service.offers([e2.sha256], [e1.sha256]) == []  # within RETRY_SECONDS
        assert _computed(metrics) == {"ready": 0, "useless": 0, "failed": 1}
        assert DeltaPatch.select().count() == 0
    finally:
        await service.stop()
        env.database.close()
