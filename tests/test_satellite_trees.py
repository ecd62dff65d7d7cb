"""Tree assembly by links (satellite/trees.py) and batched package publishing (satellite/pkgs.py).

Trees link each top-level entry into `pkgs/`; only directories that several packages share are
real. These tests pin that layout down, and what must never happen because of it: tree GC or a
rebuild reaching into `pkgs/`, or a foreign link passing verification.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from satellite.store import SatelliteStore
from shared.errors import StoreError
from shared.manifest import ManifestEntry
from tests.test_satellite_store import make_manifest, materialise, put_blob, wheel_entry
from tests.wheelfactory import WheelSpec

INIT = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


@pytest.fixture
def store(tmp_path: Path) -> SatelliteStore:
    return SatelliteStore(tmp_path / "data")


def _namespace_pair(tmp_path: Path) -> list[tuple[ManifestEntry, bytes]]:
    specs = [
        WheelSpec("ns-a", "1.0", files={"google/__init__.py": INIT, "google/a/__init__.py": b""}),
        WheelSpec("ns-b", "1.0", files={"google/__init__.py": INIT, "google/b/x.py": b"X = 1\n"}),
    ]
    return [wheel_entry(tmp_path / "wheels", s) for s in specs]


def test_top_level_entries_are_relative_links_and_shared_dirs_are_real(
    store: SatelliteStore, tmp_path: Path
) -> None:
    built = _namespace_pair(tmp_path)
    manifest = make_manifest([e for e, _ in built])
    site = materialise(store, manifest, {e.sha256: d for e, d in built})
    a, b = (e for e, _ in built)
    dist_info = site / "ns_a-1.0.dist-info"
    assert dist_info.is_symlink()
    assert not os.readlink(dist_info).startswith("/")  # the data dir may move
    assert dist_info.resolve() == (store.pkgs.site(a.sha256) / dist_info.name).resolve()
    shared = site / "google"
    assert shared.is_dir() and not shared.is_symlink()  # two packages: a real directory
    assert (shared / "a").is_symlink() and (shared / "b").is_symlink()
    assert (shared / "b" / "x.py").resolve().is_relative_to(store.pkgs.site(b.sha256).resolve())
    assert (shared / "__init__.py").read_bytes() == INIT  # identical in both: linked once
    assert store.verify_tree(manifest.lockfile_hash) == []


def test_tree_gc_and_rebuild_never_touch_the_packages(
    store: SatelliteStore, tmp_path: Path
) -> None:
    built = _namespace_pair(tmp_path)
    blobs = {e.sha256: d for e, d in built}
    first = make_manifest([e for e, _ in built])
    materialise(store, first, blobs)
    store.assemble_tree(first, replace=True)  # a rebuild swaps and deletes the old tree
    second = make_manifest([built[0][0]], sequence=2)
    materialise(store, second, blobs)
    store.flip_current(second.lockfile_hash)
    store.retire_others(now=0.0)
    assert store.gc_trees(grace_seconds=0.0, now=10.0) == [first.lockfile_hash]
    for entry, _ in built:
        assert store.has_pkg(entry.sha256)
        assert store.verify_pkg(entry.sha256) == []
    assert store.verify_tree(second.lockfile_hash) == []


def test_foreign_or_redirected_links_fail_verification(
    store: SatelliteStore, tmp_path: Path
) -> None:
    entry, data = wheel_entry(tmp_path / "wheels", WheelSpec("alpha", "1.0"))
    manifest = make_manifest([entry])
    site = materialise(store, manifest, {entry.sha256: data})
    site.chmod(0o755)
    (site / "sneaky").symlink_to("/etc")
    link = site / "alpha"
    link.unlink()
    link.symlink_to(tmp_path)  # same name, somewhere else
    problems = "\n".join(store.verify_tree(manifest.lockfile_hash))
    assert "unexpected symlink sneaky" in problems
    assert "symlink alpha points elsewhere" in problems


def test_staged_packages_appear_only_when_published(store: SatelliteStore, tmp_path: Path) -> None:
    built = [wheel_entry(tmp_path / "wheels", WheelSpec(n, "1.0")) for n in ("one", "two")]
    for entry, data in built:
        put_blob(store, entry, data)
    staged = [store.stage_pkg(entry) for entry, _ in built]
    assert all(s is not None for s in staged)
    assert not any(store.has_pkg(e.sha256) for e, _ in built)
    store.publish_pkgs([s for s in staged if s is not None])
    assert all(store.has_pkg(e.sha256) for e, _ in built)
    assert store.stage_pkg(built[0][0]) is None  # already unpacked: nothing to stage
    assert not list(store.pkgs.root.glob(".tmp-*"))


def test_a_file_where_another_wheel_has_a_directory_is_refused(
    store: SatelliteStore, tmp_path: Path
) -> None:
    specs = [
        WheelSpec("one", "1.0", files={"shared": b"I am a file\n"}),
        WheelSpec("two", "1.0", files={"shared/x.py": b"X = 2\n"}),
    ]
    built = [wheel_entry(tmp_path / "wheels", s) for s in specs]
    manifest = make_manifest([e for e, _ in built])
    with pytest.raises(StoreError, match=r"shared/x.py.*clashes with the file shared"):
        materialise(store, manifest, {e.sha256: d for e, d in built})
    assert not store.has_tree(manifest.lockfile_hash)


def test_replacing_a_damaged_package_heals_the_tree_in_place(
    store: SatelliteStore, tmp_path: Path
) -> None:
    entry, data = wheel_entry(tmp_path / "wheels", WheelSpec("alpha", "1.0"))
    manifest = make_manifest([entry])
    site = materialise(store, manifest, {entry.sha256: data})
    target = site / "alpha" / "__init__.py"
    original = target.read_bytes()
    target.chmod(0o644)
    target.write_bytes(b"HACKED = True\n")  # lands in pkgs/: the tree links there
    assert store.verify_pkg(entry.sha256) != []
    store.replace_pkg(entry)  # a fresh copy swapped in whole: the links never dangle
    assert target.read_bytes() == original
    assert store.verify_pkg(entry.sha256) == []
    assert store.verify_tree(manifest.lockfile_hash) == []
    assert not list(store.pkgs.root.glob(".tmp-*"))
