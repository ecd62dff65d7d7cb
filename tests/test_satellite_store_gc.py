"""Satellite store GC and patch application on real files with real wheels (issue 17)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from satellite.store import SatelliteStore
from satellite.sync import DeltaOffer, StoreGcPolicy
from shared.errors import IntegrityError, StoreError
from shared.manifest import Manifest, ManifestEntry
from shared.zstd_patch import make_patch
from tests.test_satellite_store import make_manifest, materialise, wheel_entry
from tests.wheelfactory import WheelSpec

PAYLOAD = os.urandom(40_000)
DAY = 86_400.0
NOW = 1_900_000_000.0


def _alpha(out: Path, version: str) -> tuple[ManifestEntry, bytes]:
    files = {
        "alpha/__init__.py": f"VERSION = {version!r}\n".encode(),
        "alpha/payload.bin": PAYLOAD,
    }
    return wheel_entry(out, WheelSpec("alpha", version, files=files))


class Fleet:
    """One satellite store going through releases: alpha changes, beta stays."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.store = SatelliteStore(tmp_path / "data")
        self.beta = wheel_entry(tmp_path / "wheels", WheelSpec("beta", "1.0"))
        self.manifests: dict[str, Manifest] = {}
        self.alphas: dict[str, ManifestEntry] = {}
        self.sequence = 0

    def release(self, version: str, at: float) -> Manifest:
        alpha, data = _alpha(self.tmp / "wheels", version)
        self.alphas[version] = alpha
        self.sequence += 1
        manifest = make_manifest([alpha, self.beta[0]], self.sequence)
        blobs = {alpha.sha256: data, self.beta[0].sha256: self.beta[1]}
        materialise(self.store, manifest, blobs)
        self.store.flip_current(manifest.lockfile_hash)
        self.store.retire_others(at)
        self.manifests[version] = manifest
        return manifest

    def gc(self, **policy: object) -> object:
        return self.store.gc_store(StoreGcPolicy(**policy), 3600.0, NOW)  # type: ignore[arg-type]

    def blob(self, version: str) -> bool:
        return self.store.has_blob(self.alphas[version].sha256)

    def pkg(self, version: str) -> bool:
        return self.store.has_pkg(self.alphas[version].sha256)

    def size(self) -> int:
        root = self.store.root
        total = sum(p.stat().st_size for p in (root / "blobs").glob("??/*.whl"))
        for marker in (root / "pkgs").glob("*/.spk-complete"):
            total += sum(p.stat().st_size for p in marker.parent.rglob("*") if p.is_file())
            total -= marker.stat().st_size
        return total


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def test_gc_keeps_current_grace_pinned_and_one_base_and_deletes_the_rest(fleet: Fleet) -> None:
    fleet.release("1.0", NOW - 3 * DAY)
    fleet.release("2.0", NOW - 2 * DAY)
    pinned = fleet.release("3.0", NOW - DAY)
    fleet.release("4.0", NOW - 60)  # 4.0's flip retired 3.0 a day ago, 4.0 was retired now
    current = fleet.release("5.0", NOW - 30)
    with fleet.store.pin_tree(pinned.lockfile_hash):
        report = fleet.gc(keep_bases=1)
    store = fleet.store
    assert store.current_hash() == current.lockfile_hash
    assert store.verify_tree(current.lockfile_hash) == []
    assert store.has_tree(pinned.lockfile_hash)  # retired long ago, but a run pins it
    assert store.has_tree(fleet.manifests["4.0"].lockfile_hash)  # within grace
    assert not store.has_tree(fleet.manifests["2.0"].lockfile_hash)
    # Packages: exactly those of the trees on disk; blobs: those plus one delta base (2.0, the
    # newest version no tree needs); 1.0 is gone entirely. beta is shared and stays.
    assert [v for v in ("1.0", "2.0", "3.0", "4.0", "5.0") if fleet.pkg(v)] == ["3.0", "4.0", "5.0"]
    assert [v for v in ("1.0", "2.0", "3.0", "4.0", "5.0") if fleet.blob(v)] == [
        "2.0",
        "3.0",
        "4.0",
        "5.0",
    ]
    assert store.has_pkg(fleet.beta[0].sha256) and store.has_blob(fleet.beta[0].sha256)
    assert report.blobs_removed == 1 and report.pkgs_removed == 2  # type: ignore[attr-defined]
    # No sidecar outlives its blob; the base keeps its own (the next sync names it to the core).
    metas = {p.name.split(".")[0] for p in (store.root / "blobs").glob("??/*.json")}
    assert fleet.alphas["1.0"].sha256 not in metas and fleet.alphas["2.0"].sha256 in metas
    bases = store.delta_bases([_alpha(fleet.tmp / "wheels", "6.0")[0]])
    # Nearest versions first, three at most: the core picks among them.
    assert bases.bases == tuple(fleet.alphas[v].sha256 for v in ("5.0", "4.0", "3.0"))


def test_keep_bases_zero_keeps_only_what_trees_need(fleet: Fleet) -> None:
    fleet.release("1.0", NOW - 3 * DAY)
    fleet.release("2.0", NOW - 2 * DAY)  # retires 1.0 two days ago: past the grace
    fleet.gc(keep_bases=0)
    assert not fleet.blob("1.0") and not fleet.pkg("1.0") and fleet.blob("2.0")


def test_the_byte_cap_evicts_bases_then_trees_in_grace_never_current_or_pinned(
    fleet: Fleet,
) -> None:
    fleet.release("1.0", NOW - 4 * DAY)
    in_grace = fleet.release("2.0", NOW - 3 * DAY)  # 1.0 retired 3 days ago: gone, a base
    pinned = fleet.release("3.0", NOW - 60)  # 2.0 retired a minute ago: within grace
    current = fleet.release("4.0", NOW - 50)  # 3.0 retired too; a run will pin it
    fleet.gc(keep_bases=1)
    assert fleet.blob("1.0")  # the base, while there is room
    one_tree = fleet.size() // 4
    with fleet.store.pin_tree(pinned.lockfile_hash):
        report = fleet.gc(keep_bases=1, max_store_bytes=3 * one_tree)
    store = fleet.store
    assert not fleet.blob("1.0")  # the base went first
    assert not store.has_tree(in_grace.lockfile_hash)  # then the oldest retired tree
    assert store.has_tree(pinned.lockfile_hash) and store.current_hash() == current.lockfile_hash
    assert store.verify_tree(current.lockfile_hash) == []
    assert report.trees_evicted == 1 and not report.over_cap  # type: ignore[attr-defined]
    # A cap below what must stay: nothing in use goes, and the report says so.
    with fleet.store.pin_tree(pinned.lockfile_hash):
        tight = fleet.gc(keep_bases=1, max_store_bytes=1000)
    assert tight.over_cap and store.has_tree(pinned.lockfile_hash)  # type: ignore[attr-defined]
    assert store.verify_tree(current.lockfile_hash) == []


def test_the_store_stays_under_the_cap_over_fifty_upgrades(fleet: Fleet) -> None:
    first = fleet.release("1.0", NOW - 1000)
    cap = 3 * fleet.size()  # room for about three versions of everything
    assert fleet.store.has_tree(first.lockfile_hash)
    sizes = []
    for n in range(2, 52):
        fleet.release(f"{n}.0", NOW - 1000 + n)
        report = fleet.gc(keep_bases=1, max_store_bytes=cap)
        sizes.append(fleet.size())
        assert fleet.size() <= cap, (n, fleet.size(), cap)
        assert report.store_bytes <= cap  # type: ignore[attr-defined]
        assert fleet.store.verify_tree(fleet.manifests[f"{n}.0"].lockfile_hash) == []
    assert max(sizes) <= cap


# ---- applying a patch ----


def _download_patch(store: SatelliteStore, patch: bytes) -> str:
    sha = hashlib.sha256(patch).hexdigest()
    writer = store.open_patch_writer(sha, len(patch))
    writer.write(patch)
    writer.commit()
    return sha


def test_a_patch_makes_the_verified_blob_and_goes(fleet: Fleet) -> None:
    fleet.release("1.0", NOW)
    old = fleet.alphas["1.0"]
    new, new_data = _alpha(fleet.tmp / "wheels", "2.0")
    patch, window_log = make_patch(fleet.store.blob_path(old.sha256).read_bytes(), new_data)
    sha = _download_patch(fleet.store, patch)
    offer = DeltaOffer(new.sha256, old.sha256, sha, len(patch), window_log)
    fleet.store.apply_patch(new, offer, 27)
    assert fleet.store.blob_path(new.sha256).read_bytes() == new_data
    assert not any((fleet.store.root / "blobs" / ".patches").iterdir())
    assert not any((fleet.store.root / "blobs" / ".partial").iterdir())


def test_a_bad_patch_leaves_nothing_behind(fleet: Fleet) -> None:
    fleet.release("1.0", NOW)
    old = fleet.alphas["1.0"]
    new, new_data = _alpha(fleet.tmp / "wheels", "2.0")
    other = _alpha(fleet.tmp / "other", "2.0")[1] + b"x"  # other bytes than the manifest's
    patch, window_log = make_patch(fleet.store.blob_path(old.sha256).read_bytes(), other)
    sha = _download_patch(fleet.store, patch)
    with pytest.raises(IntegrityError, match="from a patch"):
        fleet.store.apply_patch(
            new, DeltaOffer(new.sha256, old.sha256, sha, len(patch), window_log), 27
        )
    assert not fleet.store.has_blob(new.sha256)
    assert not any((fleet.store.root / "blobs" / ".partial").iterdir())
    assert not any((fleet.store.root / "blobs" / ".patches").iterdir())
    gone = DeltaOffer(new.sha256, "e" * 64, sha, len(patch), window_log)
    _download_patch(fleet.store, patch)
    with pytest.raises(StoreError, match="base blob"):
        fleet.store.apply_patch(new, gone, 27)
    assert new_data  # the whole blob is what the caller pulls next
