"""Figure 1: materialise the set on a satellite (cold, warm, re-flip) vs uv and pip.

Ours is timed inside one long-lived process, as in the agent (which is always running): the
reconciler's own steps over the real store, blobs already on disk. The peers are whole
processes, as a user runs them. Every timed step starts after os.sync(), so nobody pays for
the previous step's dirty pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from satellite.store import AsyncStore, SatelliteStore
from satellite.sync.materialiser import ensure_pkgs
from satellite.sync.ports import SyncReport
from satellite.sync.results import Progress
from scripts.benchlib.common import (
    PYTHON,
    Bench,
    Row,
    child_env,
    ensure_uv,
    median,
    remove_tree,
    run_timed,
    venv_bin,
)
from scripts.benchlib.workload import Workload, pin_of
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment


class _OfflineCore:
    """The blobs are on disk already: a pull would be a bug in the benchmark."""

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        raise AssertionError("offline")

    async def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        raise AssertionError(f"blob {sha256} should be on disk")
        yield b""  # pragma: no cover

    async def report(self, report: SyncReport) -> None:
        return None


def entries_for(wheels: list[Path]) -> list[ManifestEntry]:
    out = []
    for wheel in wheels:
        name, version = pin_of(wheel)
        data = wheel.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        out.append(ManifestEntry(name, version, wheel.name, sha, len(data), True))
    return out


def _seed_blobs(store: SatelliteStore, wheels: list[Path], entries: list[ManifestEntry]) -> None:
    for wheel, entry in zip(wheels, entries, strict=True):
        dest = store.blob_path(entry.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel, dest)


def _materialise(store: SatelliteStore, manifest: Manifest) -> None:
    """What reconcile_to_hash does between "manifest verified" and "flipped"."""
    asyncio.run(
        ensure_pkgs(
            manifest.entries, AsyncStore(store), _OfflineCore(), Progress(), 4, os.cpu_count() or 2
        )
    )
    store.assemble_tree(manifest)
    store.flip_current(manifest.lockfile_hash)


def _sync_then_time(fn: object) -> float:
    os.sync()
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def run(bench: Bench, work: Workload) -> None:
    print(f"figure 1: materialise {work.name} ({len(work.wheels)} wheels)", flush=True)
    entries = entries_for(work.wheels)
    env = TargetEnvironment("3.11", "cp", "cp311", "")
    peers = _Peers(bench, work)
    cold: list[float] = []
    warm: list[float] = []
    reflip: list[float] = []
    # Ours and every peer back to back in each round, so a change in the machine's load (other
    # work on a shared VM) hits all of them alike; the per-round ratios show the spread.
    for r in range(bench.rounds):
        store = SatelliteStore(bench.scratch(f"mat-{r}"))
        _seed_blobs(store, work.wheels, entries)
        first = Manifest.build(entries, env)
        second = Manifest.build(entries, dataclasses.replace(env, platform=f"warm-{r}"))
        cold.append(_sync_then_time(lambda s=store, m=first: _materialise(s, m)))
        warm.append(_sync_then_time(lambda s=store, m=second: _materialise(s, m)))

        def flip_back(s: SatelliteStore = store, h: str = first.lockfile_hash) -> None:
            assert s.has_tree(h)  # the reconciler's check before it only flips
            s.flip_current(h)

        reflip.append(_sync_then_time(flip_back))
        remove_tree(store.root)
        peers.round(r)

    uv_cold = median(peers.uv_cold) if peers.uv_cold else None
    uv_warm = median(peers.uv_warm) if peers.uv_warm else None
    ours_cold, ours_warm = median(cold), median(warm)
    cold_note = warm_note = ""
    if peers.uv_cold:
        cold_note = "per-round ratios " + _r(
            [a / b for a, b in zip(cold, peers.uv_cold, strict=True)], 2
        )
        warm_note = "per-round ratios " + _r(
            [a / b for a, b in zip(warm, peers.uv_warm, strict=True)], 2
        )
    bench.add(
        Row(
            "1",
            "cold: unpack + tree + flip",
            ours_cold,
            "s",
            "uv, empty cache",
            uv_cold,
            "<= 1.0x uv cold",
            None if uv_cold is None else ours_cold <= uv_cold,
            cold_note,
        )
    )
    bench.add(
        Row(
            "1",
            "warm: new tree from unpacked pkgs + flip",
            ours_warm,
            "s",
            "uv, warm cache",
            uv_warm,
            "<= 0.5x uv warm",
            None if uv_warm is None else ours_warm <= 0.5 * uv_warm,
            warm_note,
        )
    )
    bench.add(Row("1", "cold (same run) vs pip", ours_cold, "s", "pip --target", median(peers.pip)))
    bench.add(
        Row(
            "1",
            "re-flip to a built tree",
            median(reflip),
            "s",
            target="<= 10 ms",
            met=median(reflip) <= 0.010,
        )
    )
    bench.notes.append(
        f"figure 1 rounds (s): cold {_r(cold)}; warm {_r(warm)}; re-flip {_r(reflip)}"
    )
    if peers.uv_cold:
        bench.notes.append(
            f"figure 1 peers (s): uv cold {_r(peers.uv_cold)}; uv warm {_r(peers.uv_warm)}"
        )
    bench.notes.append(f"figure 1 peers (s): pip {_r(peers.pip)}")


def _r(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


class _Peers:
    """uv (empty and warm cache) and pip, one install each per round, into fresh targets."""

    def __init__(self, bench: Bench, work: Workload) -> None:
        self.bench = bench
        self.pins = [f"{n}=={v}" for n, v in work.pins]
        self.find_links = str(work.wheels[0].parent)
        self.env = child_env()
        uv = venv_bin("uv") if bench.smoke else ensure_uv()
        self.uv = uv if uv is not None and Path(uv).exists() else None
        self.uv_cold: list[float] = []
        self.uv_warm: list[float] = []
        self.pip: list[float] = []
        self.warm_cache = bench.scratch("uv-warm-cache")
        if self.uv is not None:  # fill the warm cache once, untimed
            self._uv(bench.scratch("uv-prime"), self.warm_cache)

    def _uv(self, target: Path, cache: Path) -> float:
        assert self.uv is not None
        argv = [self.uv, "pip", "install", "--offline", "--no-index", "--find-links"]
        argv += [self.find_links, "--python", PYTHON, "-q", "--target", str(target), *self.pins]
        os.sync()
        return run_timed(argv, env=dict(self.env, UV_CACHE_DIR=str(cache)))

    def round(self, r: int) -> None:
        bench = self.bench
        if self.uv is not None:
            cache = bench.scratch(f"uv-cache-{r}")
            self.uv_cold.append(self._uv(bench.scratch(f"uv-cold-{r}"), cache))
            self.uv_warm.append(self._uv(bench.scratch(f"uv-warm-{r}"), self.warm_cache))
        argv = [PYTHON, "-m", "pip", "install", "--isolated", "--disable-pip-version-check"]
        argv += ["-q", "--no-index", "--find-links", self.find_links]
        argv += ["--target", str(bench.scratch(f"pip-{r}")), *self.pins]
        os.sync()
        self.pip.append(run_timed(argv, env=self.env))
        for name in (f"uv-cache-{r}", f"uv-cold-{r}", f"uv-warm-{r}", f"pip-{r}"):
            remove_tree(bench.work / name)
