"""Shared pieces of the fault-injection tests (issue 7): modes, figures, wheel sets, checks.

Short mode runs in the normal suite; long mode (`SPK_STRESS_LONG=1`, what `scripts/stress` sets)
produces the figures in docs/reliability.md. Every test records its figures with `record()`;
when `SPK_STRESS_FIGURES` names a file they are merged into it (scripts/stress renders the doc
from that file), otherwise they only go to the test log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import AdminClient
from tests.wheelfactory import WheelSpec, build_wheel

LONG = os.environ.get("SPK_STRESS_LONG", "") not in ("", "0")
TEMP_MARKERS = (".tmp-", "current.tmp-")


def pick(short: Any, long: Any) -> Any:
    """The short-mode value in the normal suite, the long one under scripts/stress."""
    return long if LONG else short


def record(fault: str, **figures: Any) -> None:
    """Merge `figures` under `fault` into $SPK_STRESS_FIGURES (if set) and print them."""
    figures = {"mode": "long" if LONG else "short", **figures}
    print(f"[stress] {fault}: {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get("SPK_STRESS_FIGURES")
    if not target:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # scripts/stress may run modules in parallel one day
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        data[fault] = figures
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- wheel sets


@dataclass(frozen=True)
class WheelSet:
    """Wheels built into an index directory, and the pins that select them."""

    wheels: tuple[Path, ...]

    @property
    def pins(self) -> list[tuple[str, str]]:
        out = []
        for wheel in self.wheels:
            dist, version = wheel.name.split("-")[:2]
            out.append((dist.replace("_", "-"), version))
        return out

    @property
    def total_bytes(self) -> int:
        return sum(w.stat().st_size for w in self.wheels)


def build_set(
    out_dir: Path,
    names: Iterable[str],
    version: str,
    files_per_pkg: int,
    mean_file_size: int,
    seed: int,
    binary_share: float = 0.2,
) -> WheelSet:
    """Wheels shaped like real ones: many modules of text plus some incompressible data files.

    Content depends on (name, version, seed) only, so a rebuild gives the same sha256.
    """
    wheels = []
    for name in names:
        rng = random.Random(f"{name}-{version}-{seed}")
        mod = name.replace("-", "_")
        files: dict[str, bytes] = {}
        for i in range(files_per_pkg):
            size = max(16, int(rng.expovariate(1 / mean_file_size)))
            sub = f"sub{i % 7}/" if i % 3 else ""
            if rng.random() < binary_share:
                files[f"{mod}/{sub}data{i}.bin"] = rng.randbytes(size)
            else:
                words = [f"v{rng.randrange(10**6)}" for _ in range(size // 8 + 1)]
                body = f"# {name} {version} module {i}\nX = {words!r}\n".encode()
                files[f"{mod}/{sub}m{i}.py"] = body[:size] + b"\n"
        files[f"{mod}/__init__.py"] = f"VERSION = {version!r}\n".encode()
        wheels.append(build_wheel(WheelSpec(name, version, files=files), out_dir))
    return WheelSet(tuple(wheels))


def expected_files(wheels: Iterable[Path]) -> dict[str, str]:
    """relative path -> sha256 of every file the wheels install, read from the archives."""
    out: dict[str, str] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    out[info.filename] = hashlib.sha256(zf.read(info)).hexdigest()
    return out


def hash_tree(site: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `site`, following the tree's symlinks."""
    out: dict[str, str] = {}
    for dirpath, _, filenames in os.walk(site, followlinks=True):
        base = os.path.relpath(dirpath, site)
        for name in filenames:
            rel = name if base == "." else f"{base}/{name}"
            with open(os.path.join(dirpath, name), "rb") as f:
                out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def read_problem(site: Path, expected: dict[str, str]) -> str | None:
    """What a script run reading every file of a pinned tree would trip on first; None if
    every file reads back with its expected sha256."""
    for rel, sha in expected.items():
        try:
            data = (site / rel).read_bytes()
        except OSError as exc:
            return f"{rel}: {exc}"
        if hashlib.sha256(data).hexdigest() != sha:
            return f"{rel} changed"
    return None


def tree_problems(site: Path, expected: dict[str, str]) -> list[str]:
    """Our own check of a tree against the wheels' contents: missing, changed, extra."""
    try:
        actual = hash_tree(site)
    except OSError as exc:
        return [f"cannot read {site}: {exc}"]
    problems = [f"missing {rel}" for rel in sorted(expected.keys() - actual.keys())]
    problems += [f"extra {rel}" for rel in sorted(actual.keys() - expected.keys())]
    problems += [
        f"changed {rel}" for rel in sorted(expected.keys() & actual.keys())
        if expected[rel] != actual[rel]
    ]  # fmt: skip
    return problems


def temp_leftovers(data_dir: Path) -> list[Path]:
    """Unfinished builds and temp files anywhere in a satellite data dir (partials excluded)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in [*dirnames, *filenames]:
            if name.startswith(TEMP_MARKERS) or ".tmp-" in name:
                found.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-")]
    return found


# --------------------------------------------------------------------------- core helpers


def install(admin: AdminClient, pins: Iterable[tuple[str, str]], timeout: float = 180) -> str:
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
    )
    state = admin.install_and_wait(timeout=timeout)
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def fleet(admin: AdminClient) -> dict[str, apb.Satellite]:
    return {s.name: s for s in admin.ListSatellites(timeout=60).satellites}


class LogTail:
    """Follows a growing log file from where it was when created."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_text(self) -> str:
        if not self.path.exists():
            return ""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float, interval: float = 0.005) -> float:
        """Monotonic time at which `needle` was first seen in new output."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = (seen + self.new_text())[-4096:]
            if needle in seen:
                return time.monotonic()
            time.sleep(interval)
        raise AssertionError(f"{needle!r} not logged to {self.path} within {timeout}s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
