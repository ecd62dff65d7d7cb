"""The satellite's on-disk store, on real files with real wheels (tests/wheelfactory.py).

The helpers at the top (`wheel_entry`, `make_manifest`, `materialise`) are shared with
test_reconciler.py and test_runner.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from satellite.store import SatelliteStore
from satellite.store.trees import TREE_META, TreeDir
from satellite.sync import AgentState
from shared.errors import BlobCorrupt, IntegrityError, NotFound, StoreError, UnsafeWheel
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from tests.wheelfactory import WheelSpec, build_wheel

ENV = TargetEnvironment(python_version="3.11")


def wheel_entry(out: Path, spec: WheelSpec) -> tuple[ManifestEntry, bytes]:
    """Build a real wheel and the manifest entry that describes it."""
    data = build_wheel(spec, out).read_bytes()
    entry = ManifestEntry(
        name=spec.name,
        version=spec.version,
        filename=spec.filename,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        requested=True,
    )
    return entry, data


def make_manifest(entries: list[ManifestEntry], sequence: int = 1) -> Manifest:
    return Manifest.build(entries, ENV, sequence=sequence)


def put_blob(store: SatelliteStore, entry: ManifestEntry, data: bytes) -> None:
    writer = store.open_blob_writer(entry.sha256, entry.size)
    writer.write(data)
    writer.commit()


def materialise(store: SatelliteStore, manifest: Manifest, blobs: dict[str, bytes]) -> Path:
    """What a reconcile does, minus the network: blobs in, unpack, assemble."""
    for entry in manifest.entries:
        if not store.has_blob(entry.sha256):
            put_blob(store, entry, blobs[entry.sha256])
        store.unpack(entry)
    return store.assemble_tree(manifest)


def temp_leftovers(root: Path) -> list[Path]:
    found = [p for p in root.rglob(".tmp-*")]
    found += list(root.glob("current.tmp-*"))
    return found


@pytest.fixture
def store(tmp_path: Path) -> SatelliteStore:
    return SatelliteStore(tmp_path / "data")


Two = tuple[list[ManifestEntry], dict[str, bytes]]


@pytest.fixture
def two(tmp_path: Path) -> Two:
    entries: list[ManifestEntry] = []
    blobs: dict[str, bytes] = {}
    for name, version in (("alpha", "1.0"), ("beta", "2.0")):
        entry, data = wheel_entry(tmp_path / "wheels", WheelSpec(name, version))
        entries.append(entry)
        blobs[entry.sha256] = data
    return entries, blobs


# -- blobs ---------------------------------------------------------------------------------


def test_blob_writer_resumes_a_partial_download(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    entry = entries[0]
    data = blobs[entry.sha256]
    half = len(data) // 2
    writer = store.open_blob_writer(entry.sha256, entry.size)
    writer.write(data[:half])
    writer.close()  # a dropped stream: the partial stays
    assert store.partial_offset(entry.sha256) == half

    resumed = store.open_blob_writer(entry.sha256, entry.size)
    assert resumed.offset == half
    resumed.write(data[half:])
    final = resumed.commit()
    assert final == store.blob_path(entry.sha256)
    assert final.read_bytes() == data
    assert store.has_blob(entry.sha256)
    assert store.partial_offset(entry.sha256) == 0


def test_hash_mismatch_after_resume_deletes_the_partial(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    entry = entries[0]
    data = blobs[entry.sha256]
    half = len(data) // 2
    writer = store.open_blob_writer(entry.sha256, entry.size)
    writer.write(b"\0" * half)  # a rotten partial
    writer.close()
    resumed = store.open_blob_writer(entry.sha256, entry.size)
    resumed.write(data[half:])
    with pytest.raises(IntegrityError, match=entry.sha256):
        resumed.commit()
    assert store.partial_offset(entry.sha256) == 0
    assert not store.has_blob(entry.sha256)


def test_endless_data_is_refused(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    entry = entries[0]
    writer = store.open_blob_writer(entry.sha256, entry.size)
    writer.write(blobs[entry.sha256])
    with pytest.raises(IntegrityError, match="more data than the declared"):
        writer.write(b"x")
    assert store.partial_offset(entry.sha256) == 0
    assert not store.has_blob(entry.sha256)


def test_oversized_partial_starts_over(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    entry = entries[0]
    partial = store.blobs.partial_path(entry.sha256)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * (entry.size + 10))
    writer = store.open_blob_writer(entry.sha256, entry.size)
    assert writer.offset == 0
    writer.write(blobs[entry.sha256])
    writer.commit()
    assert store.has_blob(entry.sha256)


def test_a_hash_that_is_not_a_sha256_never_becomes_a_path(store: SatelliteStore) -> None:
    with pytest.raises(IntegrityError, match="not a sha256"):
        store.open_blob_writer("../../etc/passwd", 10)


# -- packages and trees --------------------------------------------------------------------


def test_unpack_assemble_and_flip(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    site = materialise(store, manifest, blobs)
    assert (site / "alpha" / "__init__.py").read_text().startswith("NAME = 'alpha'")
    assert (site / "beta-2.0.dist-info" / "RECORD").is_file()
    # Links into pkgs/ (one symlink per top-level entry), not copies.
    pkg_file = store.pkgs.site(entries[0].sha256) / "alpha" / "__init__.py"
    assert os.stat(site / "alpha" / "__init__.py").st_ino == os.stat(pkg_file).st_ino
    assert store.current_hash() is None

    store.flip_current(manifest.lockfile_hash)
    assert os.readlink(store.root / "current") == f"trees/{manifest.lockfile_hash}"
    assert store.current_hash() == manifest.lockfile_hash
    assert store.verify_tree(manifest.lockfile_hash) == []
    assert store.tree_manifest(manifest.lockfile_hash) == manifest
    assert store.tree_size_bytes(manifest.lockfile_hash) > 0
    assert temp_leftovers(store.root) == []


def test_unpack_reverifies_the_blob_and_deletes_a_rotten_one(
    store: SatelliteStore, two: Two
) -> None:
    entries, blobs = two
    entry = entries[0]
    put_blob(store, entry, blobs[entry.sha256])
    path = store.blob_path(entry.sha256)
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    path.write_bytes(bytes(rotten))
    with pytest.raises(BlobCorrupt, match=entry.sha256):
        store.unpack(entry)
    assert not store.has_blob(entry.sha256)
    assert not store.has_pkg(entry.sha256)
    assert temp_leftovers(store.root) == []


def test_unsafe_wheel_leaves_nothing_behind(store: SatelliteStore, tmp_path: Path) -> None:
    spec = WheelSpec("evil", "1.0", symlinks={"evil/link": "/etc/passwd"})
    entry, data = wheel_entry(tmp_path / "wheels", spec)
    put_blob(store, entry, data)
    with pytest.raises(UnsafeWheel, match="symlink"):
        store.unpack(entry)
    assert not store.has_pkg(entry.sha256)
    assert temp_leftovers(store.root) == []


def test_namespace_package_shared_by_two_wheels(store: SatelliteStore, tmp_path: Path) -> None:
    init = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    specs = [
        WheelSpec("ns-a", "1.0", files={"google/__init__.py": init, "google/a/__init__.py": b""}),
        WheelSpec("ns-b", "1.0", files={"google/__init__.py": init, "google/b/__init__.py": b""}),
    ]
    built = [wheel_entry(tmp_path / "wheels", s) for s in specs]
    manifest = make_manifest([e for e, _ in built])
    site = materialise(store, manifest, {e.sha256: d for e, d in built})
    assert (site / "google" / "a" / "__init__.py").is_file()
    assert (site / "google" / "b" / "__init__.py").is_file()
    assert store.verify_tree(manifest.lockfile_hash) == []


def test_conflicting_files_are_refused_naming_both_wheels(
    store: SatelliteStore, tmp_path: Path
) -> None:
    specs = [
        WheelSpec("one", "1.0", files={"shared/x.py": b"ONE = 1\n"}),
        WheelSpec("two", "1.0", files={"shared/x.py": b"TWO = 2\n"}),
    ]
    built = [wheel_entry(tmp_path / "wheels", s) for s in specs]
    manifest = make_manifest([e for e, _ in built])
    with pytest.raises(StoreError, match=r"one-1.0-py3-none-any.whl and two-1.0-.*shared/x.py"):
        materialise(store, manifest, {e.sha256: d for e, d in built})
    assert not store.has_tree(manifest.lockfile_hash)
    assert temp_leftovers(store.root) == []


def test_current_hash_is_none_when_missing_dangling_or_foreign(
    store: SatelliteStore, two: Two
) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    assert store.current_hash() is None
    materialise(store, manifest, blobs)
    store.flip_current(manifest.lockfile_hash)
    (store.root / "current").unlink()
    (store.root / "current").symlink_to("/tmp")
    assert store.current_hash() is None
    (store.root / "current").unlink()
    (store.root / "current").symlink_to(f"trees/{'0' * 64}")
    assert store.current_hash() is None
    with pytest.raises(StoreError, match="not built"):
        store.flip_current("0" * 64)


def _hack(path: Path) -> None:
    """Write into a sealed tree's file as an intruder would (its directories unsealed first:
    root would not care about the modes, others would)."""
    for directory in (path.parent.parent, path.parent):
        directory.chmod(0o755)
    path.chmod(0o644)
    path.write_text("HACKED = True\n")


def test_verify_tree_reports_changed_missing_and_extra_files(
    store: SatelliteStore, two: Two
) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    site = materialise(store, manifest, blobs)
    _hack(site / "alpha" / "__init__.py")
    (site / "beta").chmod(0o755)
    (site / "beta" / "__init__.py").unlink()
    (site / "extra.py").write_text("")
    (site / "alpha" / "__pycache__").mkdir()
    problems = "\n".join(store.verify_tree(manifest.lockfile_hash))
    assert "changed alpha/__init__.py" in problems
    assert "missing beta/__init__.py" in problems
    assert "extra file extra.py" in problems
    assert "extra directory alpha/__pycache__" in problems
    # The tree links into pkgs/: the write and the delete damaged the package cache too.
    assert store.verify_pkg(entries[0].sha256) != []
    assert store.verify_pkg(entries[1].sha256) != []


def test_a_tree_meta_names_links_not_files_and_a_gone_package_is_drift(
    store: SatelliteStore, two: Two
) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    materialise(store, manifest, blobs)
    meta = json.loads((store.trees.dir(manifest.lockfile_hash) / TREE_META).read_text())
    assert meta["format"] == 3 and "files" not in meta  # the packages' markers hold those
    assert store.tree_size_bytes(manifest.lockfile_hash) == sum(
        size for e in entries for _, size in store.pkgs.files(e.sha256).values()
    )
    store.discard_pkg(entries[1].sha256)
    problems = store.verify_tree(manifest.lockfile_hash)
    assert any(f"package {entries[1].sha256} is not unpacked" in p for p in problems), problems


def test_a_format_2_tree_of_an_older_agent_is_still_verified_by_its_own_record(
    store: SatelliteStore, two: Two
) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    site = materialise(store, manifest, blobs)
    path = store.trees.dir(manifest.lockfile_hash) / TREE_META
    meta = json.loads(path.read_text())
    files = {
        rel: [sha, size, e.sha256]
        for e in entries
        for rel, (sha, size) in store.pkgs.files(e.sha256).items()
    }
    meta.update(format=2, files=files)
    path.chmod(0o644)
    path.write_text(json.dumps(meta))
    store.trees = TreeDir(store.trees.root, store.pkgs.files)  # nothing cached
    assert store.tree_manifest(manifest.lockfile_hash) == manifest
    assert store.verify_tree(manifest.lockfile_hash) == []
    _hack(site / "alpha" / "__init__.py")
    assert any("changed alpha/__init__.py" in p for p in store.verify_tree(manifest.lockfile_hash))


def test_reassembling_replaces_a_drifted_tree(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    manifest = make_manifest(entries)
    site = materialise(store, manifest, blobs)
    store.flip_current(manifest.lockfile_hash)
    site.chmod(0o755)
    (site / "extra.py").write_text("")
    store.assemble_tree(manifest, replace=True)
    assert store.verify_tree(manifest.lockfile_hash) == []
    assert store.current_hash() == manifest.lockfile_hash
    assert temp_leftovers(store.root) == []


# -- lock, retirement, pins and GC ---------------------------------------------------------


def test_a_second_agent_on_the_same_data_dir_is_refused(store: SatelliteStore) -> None:
    with store.acquire_agent_lock():
        other = SatelliteStore(store.root)
        refused = r"another agent is using data dir .*agent\.lock"
        with pytest.raises(StoreError, match=refused), other.acquire_agent_lock():
            pass
    with SatelliteStore(store.root).acquire_agent_lock():
        pass  # released with the first agent


def _three_trees(store: SatelliteStore, tmp_path: Path) -> list[str]:
    hashes = []
    for version in ("1.0", "2.0", "3.0"):
        entry, data = wheel_entry(tmp_path / "wheels", WheelSpec("gamma", version))
        manifest = make_manifest([entry])
        materialise(store, manifest, {entry.sha256: data})
        hashes.append(manifest.lockfile_hash)
    return hashes


def test_gc_honours_grace_pins_and_never_touches_current(
    store: SatelliteStore, tmp_path: Path
) -> None:
    old, pinned, current = _three_trees(store, tmp_path)
    store.flip_current(current)
    assert sorted(store.retire_others(now=1000.0)) == sorted([old, pinned])
    assert store.retire_others(now=2000.0) == []  # marks are not moved forward

    assert store.gc_trees(grace_seconds=100, now=1050.0) == []  # within the grace
    with store.pin_tree(pinned) as pin:
        assert pin.site == store.tree_site(pinned)
        assert store.gc_trees(grace_seconds=100, now=1101.0) == [old]
        assert store.has_tree(pinned)
    assert store.gc_trees(grace_seconds=100, now=1101.0) == [pinned]
    assert store.gc_trees(grace_seconds=0, now=99999.0) == []
    assert store.has_tree(current)
    assert temp_leftovers(store.root) == []


def test_flipping_back_to_a_retired_tree_clears_its_mark(
    store: SatelliteStore, tmp_path: Path
) -> None:
    first, second, third = _three_trees(store, tmp_path)
    store.flip_current(second)
    store.retire_others(now=1000.0)  # first and third
    store.flip_current(first)  # a rollback
    store.retire_others(now=5000.0)  # second
    assert store.gc_trees(grace_seconds=100, now=5050.0) == [third]
    assert store.has_tree(first)
    assert store.has_tree(second)


def test_pinning_a_missing_tree_is_not_found(store: SatelliteStore) -> None:
    with pytest.raises(NotFound), store.pin_tree("a" * 64):
        pass


def test_cleanup_temp_keeps_resumable_partials(store: SatelliteStore, two: Two) -> None:
    entries, blobs = two
    writer = store.open_blob_writer(entries[0].sha256, entries[0].size)
    writer.write(blobs[entries[0].sha256][:10])
    writer.close()
    for path in ("trees/.tmp-x-1/site-packages/a", "pkgs/.tmp-y-2/site-packages/b"):
        (store.root / path).mkdir(parents=True)
    (store.root / "current.tmp-abcd").symlink_to("trees/x")
    removed = store.cleanup_temp()
    assert len(removed) == 3
    assert temp_leftovers(store.root) == []
    assert store.partial_offset(entries[0].sha256) == 10


def test_state_round_trip(store: SatelliteStore) -> None:
    assert store.load_state() == AgentState()
    state = AgentState(desired_hash="a" * 64, status="ready", highest_sequence=7)
    store.save_state(state)
    assert SatelliteStore(store.root).load_state() == state
    (store.root / "state.json").write_text("{not json")
    assert store.load_state() == AgentState()


def test_the_pinned_key_is_replaced_whole_or_not_at_all(
    store: SatelliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.read_pinned_key() is None
    store.pin_key("-----BEGIN PUBLIC KEY-----\nfirst\n")
    assert store.read_pinned_key() == "-----BEGIN PUBLIC KEY-----\nfirst\n"

    def crash(*args: object) -> None:
        raise OSError("power cut before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.pin_key("-----BEGIN PUBLIC KEY-----\nsecond\n")
    assert store.read_pinned_key() == "-----BEGIN PUBLIC KEY-----\nfirst\n"  # never torn
    assert temp_leftovers(store.root) == []
