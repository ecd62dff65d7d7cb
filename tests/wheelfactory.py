"""Build real wheel files for tests: well-formed ones and deliberately hostile ones."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


@dataclass
class WheelSpec:
    """A wheel to build. `files` maps archive paths to content (the dist-info is added)."""

    name: str
    version: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    requires: Sequence[str] = ()
    tag: str = "py3-none-any"
    # Hostile knobs (all off by default).
    extra_entries: Mapping[str, bytes] = field(default_factory=dict)  # written but NOT in RECORD
    record_overrides: Mapping[str, str] = field(default_factory=dict)  # path -> "hash,size" lie
    symlinks: Mapping[str, str] = field(default_factory=dict)  # archive path -> link target
    omit_record: bool = False

    @property
    def dist(self) -> str:
        return canonicalize_name(self.name).replace("-", "_")

    @property
    def filename(self) -> str:
        return f"{self.dist}-{self.version}-{self.tag}.whl"

    @property
    def dist_info(self) -> str:
        return f"{self.dist}-{self.version}.dist-info"


def default_module(spec: WheelSpec) -> dict[str, bytes]:
    mod = spec.dist
    return {f"{mod}/__init__.py": f"NAME = {spec.name!r}\nVERSION = {spec.version!r}\n".encode()}


def build_wheel(spec: WheelSpec, out_dir: Path) -> Path:
    """Write the wheel into out_dir and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = dict(spec.files) if spec.files else default_module(spec)
    meta = ["Metadata-Version: 2.1", f"Name: {spec.name}", f"Version: {spec.version}"]
    meta += [f"Requires-Dist: {r}" for r in spec.requires]
    files[f"{spec.dist_info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{spec.dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: wheelfactory\nRoot-Is-Purelib: true\nTag: {spec.tag}\n"
    ).encode()
    record_path = f"{spec.dist_info}/RECORD"
    lines = []
    for path, data in files.items():
        lines.append(spec.record_overrides.get(path, f"{_record_hash(data)},{len(data)}"))
        lines[-1] = f"{path},{lines[-1]}"
    lines.append(f"{record_path},,")
    target = out_dir / spec.filename
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        for path, data in spec.extra_entries.items():
            zf.writestr(path, data)
        for path, link in spec.symlinks.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, link)
        if not spec.omit_record:
            zf.writestr(record_path, "\n".join(lines) + "\n")
    return target


def build_sdist(name: str, version: str, out_dir: Path) -> Path:
    """A minimal sdist (tar.gz). The core must refuse to build it."""
    import io
    import tarfile

    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    target = out_dir / f"{base}.tar.gz"
    with tarfile.open(target, "w:gz") as tf:
        pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(pkg_info)
        tf.addfile(info, io.BytesIO(pkg_info))
        setup = b"from setuptools import setup\nsetup()\n"
        info = tarfile.TarInfo(f"{base}/setup.py")
        info.size = len(setup)
        tf.addfile(info, io.BytesIO(setup))
    return target
