"""An upgrade links the files it shares with the previous version instead of writing them again.

shared.wheels `reuse` at the extraction level (what is linked, what never is), then the
satellite's store choosing the donor (the project's package in the current tree) end to end on
real wheels: the new package is byte for byte what a plain unpack gives, and outlives its donor.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from satellite.store import SatelliteStore
from shared.errors import UnsafeWheel
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.tree_build import PKG_MARKER, SITE, reusable_files, unpack_package
from shared.wheels import extract_wheel
from tests.core_process import AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.test_satellite_store import make_manifest, materialise, put_blob, wheel_entry
from tests.test_wheels import record_hash
from tests.wheelfactory import WheelSpec, build_wheel

SAME = b"unchanged = True\n" * 200
OLD_FILES = {
    "pkg/__init__.py": b"",  # empty: never linked
    "pkg/same.py": SAME,
    "pkg/data/table.bin": bytes(range(256)) * 400,
    "pkg/changes.py": b"VERSION = 1\n",
    "pkg/tool.sh": b"#!/bin/sh\necho tool\n",
}
NEW_FILES = {**OLD_FILES, "pkg/changes.py": b"VERSION = 2\n", "pkg/added.py": b"NEW = 1\n"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def old_site(tmp_path: Path) -> Path:
    """Version 1.0 extracted, as a donor: `tool.sh` is not executable in it."""
    wheel = build_wheel(WheelSpec("pkg", "1.0", files=OLD_FILES), tmp_path / "w1")
    site = tmp_path / "old"
    extract_wheel(wheel, site)
    return site


def _donors(site: Path) -> dict[str, str]:
    return {
        _sha(p.read_bytes()): str(p) for p in site.rglob("*") if p.is_file() and p.stat().st_size
    }


def test_identical_files_are_linked_and_the_rest_written(tmp_path: Path, old_site: Path) -> None:
    # tool.sh has the same bytes but becomes executable: a link would share the old mode.
    spec = WheelSpec("pkg", "2.0", files=NEW_FILES, executables=["pkg/tool.sh"])
    wheel = build_wheel(spec, tmp_path / "w2")
    plain = extract_wheel(wheel, tmp_path / "plain")
    reused = extract_wheel(wheel, tmp_path / "new", reuse=_donors(old_site))

    assert reused.hashes == plain.hashes
    assert _tree(tmp_path / "new") == _tree(tmp_path / "plain")
    new, old = tmp_path / "new", old_site
    for rel in ("pkg/same.py", "pkg/data/table.bin"):
        assert (new / rel).stat().st_ino == (old / rel).stat().st_ino, rel
    for rel in ("pkg/changes.py", "pkg/added.py", "pkg/tool.sh", "pkg/__init__.py"):
        assert (new / rel).stat().st_nlink == 1, rel
    assert _tree(old_site)["pkg/changes.py"][0] == b"VERSION = 1\n"  # the donor is untouched


def test_a_donor_changed_since_it_was_unpacked_is_not_linked(
    tmp_path: Path, old_site: Path
) -> None:
    donors = _donors(old_site)
    same = old_site / "pkg" / "same.py"
    same.chmod(0o644)
    same.write_bytes(SAME.replace(b"True", b"Fals"))  # same size, other bytes
    same.chmod(0o444)
    wheel = build_wheel(WheelSpec("pkg", "2.0", files=NEW_FILES), tmp_path / "w2")
    extract_wheel(wheel, tmp_path / "new", reuse=donors)
    assert (tmp_path / "new" / "pkg" / "same.py").read_bytes() == SAME
    assert (tmp_path / "new" / "pkg" / "same.py").stat().st_nlink == 1
    assert (tmp_path / "new" / "pkg" / "data" / "table.bin").stat().st_nlink == 2


def test_a_symlink_among_the_donors_is_never_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.py"
    real.write_bytes(SAME)
    (tmp_path / "link.py").symlink_to(real)
    wheel = build_wheel(WheelSpec("pkg", "2.0", files=NEW_FILES), tmp_path / "w2")
    extract_wheel(wheel, tmp_path / "new", reuse={_sha(SAME): str(tmp_path / "link.py")})
    got = tmp_path / "new" / "pkg" / "same.py"
    assert not got.is_symlink() and got.read_bytes() == SAME
    assert got.stat().st_ino != real.stat().st_ino and real.stat().st_nlink == 1


def test_a_fifo_in_a_donors_place_neither_stalls_nor_is_linked(tmp_path: Path) -> None:
    fifo = tmp_path / "same.py"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    wheel = build_wheel(WheelSpec("pkg", "2.0", files=NEW_FILES), tmp_path / "w2")
    extract_wheel(wheel, tmp_path / "new", reuse={_sha(SAME): str(fifo)})
    got = tmp_path / "new" / "pkg" / "same.py"
    assert got.read_bytes() == SAME and got.stat().st_nlink == 1


def test_a_lying_member_is_refused_even_when_a_donor_has_what_record_says(
    tmp_path: Path, old_site: Path
) -> None:
    """Linking saves the write, never the check: the member is still inflated and compared."""
    lie = f"{record_hash(SAME)},{len(SAME)}"
    files = {**NEW_FILES, "pkg/other.py": SAME.replace(b"True", b"Fals")}  # same size
    spec = WheelSpec("pkg", "2.0", files=files, record_overrides={"pkg/other.py": lie})
    wheel = build_wheel(spec, tmp_path / "w2")
    with pytest.raises(UnsafeWheel, match=r"'pkg/other\.py' RECORD hash mismatch"):
        extract_wheel(wheel, tmp_path / "new", reuse=_donors(old_site))
    assert not (tmp_path / "new").exists()
    assert (old_site / "pkg" / "same.py").stat().st_nlink == 1  # its link went with the tree


def test_parts_with_a_donor_unpack_what_the_whole_does(tmp_path: Path, old_site: Path) -> None:
    files = {**NEW_FILES, **{f"pkg/m/f{i}.py": f"V = {i}\n".encode() * 50 for i in range(40)}}
    wheel = build_wheel(WheelSpec("pkg", "2.0", files=files), tmp_path / "w2")
    whole = extract_wheel(wheel, tmp_path / "whole")
    dest = tmp_path / "parts"
    dest.mkdir()
    donors = _donors(old_site)
    with ThreadPoolExecutor(2) as pool:
        infos = list(
            pool.map(lambda k: extract_wheel(wheel, dest, part=k, parts=2, reuse=donors), range(2))
        )
    assert {p: h for i in infos for p, h in i.hashes.items()} == whole.hashes
    assert _tree(dest) == _tree(tmp_path / "whole")
    assert (dest / "pkg" / "same.py").stat().st_ino == (old_site / "pkg" / "same.py").stat().st_ino


def test_a_package_gone_or_unreadable_offers_nothing(tmp_path: Path) -> None:
    assert reusable_files(None) == {}
    assert reusable_files(tmp_path / "missing") == {}
    broken = tmp_path / "broken"
    (broken / SITE).mkdir(parents=True)
    (broken / PKG_MARKER).write_text("{not json")
    assert reusable_files(broken) == {}
    (broken / PKG_MARKER).write_text('{"format": 1}')
    assert reusable_files(broken) == {}


# --------------------------------------------------------------------------- the satellite's store


def test_an_upgrade_links_from_the_current_package_and_outlives_it(
    tmp_path: Path,
) -> None:
    store = SatelliteStore(tmp_path / "data")
    old, old_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "1.0", files=OLD_FILES))
    other, other_data = wheel_entry(
        tmp_path / "w", WheelSpec("other", "1.0", files={"other/same.py": SAME})
    )
    first = make_manifest([old, other])
    materialise(store, first, {old.sha256: old_data, other.sha256: other_data})
    store.flip_current(first.lockfile_hash)

    new, new_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "2.0", files=NEW_FILES))
    put_blob(store, new, new_data)
    staged = store.stage_pkg(new)
    assert staged is not None
    store.publish_pkgs([staged])
    new_site, old_site = store.pkgs.site(new.sha256), store.pkgs.site(old.sha256)
    assert (new_site / "pkg/same.py").stat().st_ino == (old_site / "pkg/same.py").stat().st_ino
    # Only the same project donates: `other` ships the very same bytes.
    assert (store.pkgs.site(other.sha256) / "other/same.py").stat().st_nlink == 1
    assert store.verify_pkg(new.sha256) == []

    second = make_manifest([new, other], sequence=2)
    store.assemble_tree(second)
    store.flip_current(second.lockfile_hash)
    assert store.verify_tree(second.lockfile_hash) == []
    store.discard_pkg(old.sha256)  # what store GC does to the old version
    assert not old_site.exists()
    assert store.verify_pkg(new.sha256) == []
    assert (new_site / "pkg/same.py").read_bytes() == SAME


def test_without_a_current_tree_or_for_a_new_project_nothing_is_linked(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "data")
    old, old_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "1.0", files=OLD_FILES))
    put_blob(store, old, old_data)
    store.unpack(old)  # unpacked but not current: a first sync has nothing to link from
    new, new_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "2.0", files=NEW_FILES))
    put_blob(store, new, new_data)
    store.unpack(new)
    assert (store.pkgs.site(new.sha256) / "pkg/same.py").stat().st_nlink == 1


def test_drift_repair_never_links(tmp_path: Path) -> None:
    store = SatelliteStore(tmp_path / "data")
    old, old_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "1.0", files=OLD_FILES))
    first = make_manifest([old])
    materialise(store, first, {old.sha256: old_data})
    store.flip_current(first.lockfile_hash)
    new, new_data = wheel_entry(tmp_path / "w", WheelSpec("pkg", "2.0", files=NEW_FILES))
    put_blob(store, new, new_data)
    store.unpack(new)
    assert (store.pkgs.site(new.sha256) / "pkg/same.py").stat().st_nlink == 2
    store.replace_pkg(new)  # a fresh copy from the blob: nothing on disk is trusted
    assert (store.pkgs.site(new.sha256) / "pkg/same.py").stat().st_nlink == 1
    assert store.verify_pkg(new.sha256) == []


def test_unpack_package_records_linked_files_like_written_ones(
    tmp_path: Path, old_site: Path
) -> None:
    entry, _ = wheel_entry(tmp_path / "w", WheelSpec("pkg", "2.0", files=NEW_FILES))
    donor = tmp_path / "donor"
    donor.mkdir()
    os.rename(old_site, donor / SITE)
    marker = {"format": 1, "files": {"pkg/same.py": [_sha(SAME), len(SAME)]}}
    (donor / PKG_MARKER).write_text(json.dumps(marker))
    blob = tmp_path / "w" / entry.filename
    files = unpack_package(entry, blob, tmp_path / "new", reuse_from=donor)
    plain = unpack_package(entry, blob, tmp_path / "plain")
    assert files == plain
    assert (tmp_path / "new" / SITE / "pkg/same.py").stat().st_nlink == 2
    assert (tmp_path / "new" / PKG_MARKER).read_text() == (
        tmp_path / "plain" / PKG_MARKER
    ).read_text()


# --------------------------------------------------------------------------- end to end


def _install(admin: AdminClient, version: str) -> str:
    return admin.install_pins(("pkg", version))


def test_an_agent_upgrading_links_the_unchanged_files_and_nothing_looks_like_drift(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    satellites: list[SatelliteProcess],
) -> None:
    """Linking a current package's file changes its link count, an inotify IN_ATTRIB on the
    watched pkgs/ (watchdog reports it as an "attrib" event, which the watcher's filter
    leaves out): the drift watcher must not take that for a change of the current tree."""
    build_wheel(WheelSpec("pkg", "1.0", files=OLD_FILES), wheel_dir)
    build_wheel(WheelSpec("pkg", "2.0", files=NEW_FILES), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    first = _install(admin, "1.0")
    sat = SatelliteProcess(core, "sat-reuse", tmp_path).register()
    satellites.append(sat.start())
    eventually(lambda: sat.current() == first, timeout=60)
    second = _install(admin, "2.0")
    eventually(lambda: sat.current() == second, timeout=60)

    site = sat.data_dir / "current" / SITE
    same = (site / "pkg" / "same.py").resolve()
    assert same.stat().st_nlink == 2  # the 1.0 package's file, still kept as a delta base
    assert (site / "pkg" / "changes.py").read_bytes() == b"VERSION = 2\n"
    script = tmp_path / "check.py"
    script.write_text("import pkg.changes, pkg.same\nprint(pkg.changes.VERSION)\n")
    assert sat.run(script).stdout.strip() == "2"
    time.sleep(1.5)  # past the watcher's debounce: a repair it wanted would be logged by now
    assert "re-verifying" not in sat.log() and "drift" not in sat.log().lower()
