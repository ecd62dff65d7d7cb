"""`spk-core admin tree` on real files, with the core replaced by a plain object (the gRPC side is
covered end to end in tests/test_exports_e2e.py): what it verifies and what it reuses."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from core.app.tree_export import materialise_tree
from shared.errors import IntegrityError, NotFound, UnsafeWheel
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from tests.wheelfactory import WheelSpec, build_wheel

ENV = TargetEnvironment("3.11", "cp", "cp311", "")


class FakeCore:
    def __init__(self) -> None:
        self.manifests: dict[str, Manifest] = {}
        self.blobs: dict[str, bytes] = {}
        self.served: list[str] = []

    def add(self, *wheels: Path) -> Manifest:
        entries = []
        for wheel in wheels:
            data = wheel.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            self.blobs[sha] = data
            name, version = wheel.name.split("-")[:2]
            entries.append(ManifestEntry(name, version, wheel.name, sha, len(data), True))
        manifest = Manifest.build(entries, ENV)
        self.manifests[manifest.lockfile_hash] = manifest
        return manifest

    def manifest(self, lockfile_hash: str) -> Manifest:
        if lockfile_hash not in self.manifests:
            raise NotFound(f"no manifest with lockfile hash {lockfile_hash}")
        return self.manifests[lockfile_hash]

    def blob(self, sha256: str) -> Iterable[bytes]:
        self.served.append(sha256)
        data = self.blobs[sha256]
        return [data[:100], data[100:]]


def test_a_second_hash_reuses_packages_and_flips_the_link(tmp_path: Path) -> None:
    core = FakeCore()
    a = build_wheel(WheelSpec("alpha", "1.0"), tmp_path / "w")
    b1 = build_wheel(WheelSpec("beta", "1.0"), tmp_path / "w")
    b2 = build_wheel(WheelSpec("beta", "2.0"), tmp_path / "w")
    first, second = core.add(a, b1), core.add(a, b2)
    root = tmp_path / "editor"
    site = materialise_tree(core, first.lockfile_hash, root)
    assert (site / "beta" / "__init__.py").read_text().endswith("VERSION = '1.0'\n")
    assert len(core.served) == 2
    materialise_tree(core, second.lockfile_hash, root)
    assert len(core.served) == 3  # alpha was unpacked already
    assert (site / "beta" / "__init__.py").read_text().endswith("VERSION = '2.0'\n")
    assert os.readlink(site) == f"trees/{second.lockfile_hash}/site-packages"


def test_a_blob_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    core = FakeCore()
    manifest = core.add(build_wheel(WheelSpec("alpha", "1.0"), tmp_path / "w"))
    sha = manifest.entries[0].sha256
    data = bytearray(core.blobs[sha])
    data[50] ^= 0xFF  # inside the first local file header
    core.blobs[sha] = bytes(data)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        materialise_tree(core, manifest.lockfile_hash, tmp_path / "editor")
    assert not (tmp_path / "editor" / "site-packages").exists()
    assert list((tmp_path / "editor" / "pkgs").iterdir()) == []


def test_a_manifest_that_is_not_the_hash_asked_for_is_refused(tmp_path: Path) -> None:
    core = FakeCore()
    manifest = core.add(build_wheel(WheelSpec("alpha", "1.0"), tmp_path / "w"))
    other = "cd" * 32
    core.manifests[other] = dataclasses.replace(manifest, lockfile_hash=other)
    with pytest.raises(IntegrityError, match="hashes to"):
        materialise_tree(core, other, tmp_path / "editor")
    assert not (tmp_path / "editor").exists()


def test_a_hostile_wheel_gets_the_satellites_refusal(tmp_path: Path) -> None:
    core = FakeCore()
    hostile = build_wheel(
        WheelSpec("alpha", "1.0", record_overrides={"alpha/__init__.py": "sha256=AAAA,3"}),
        tmp_path / "w",
    )
    manifest = core.add(hostile)
    with pytest.raises(UnsafeWheel, match="RECORD"):
        materialise_tree(core, manifest.lockfile_hash, tmp_path / "editor")
    assert not (tmp_path / "editor" / "site-packages").exists()
