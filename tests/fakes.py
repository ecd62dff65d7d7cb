"""Hand-written in-memory fakes of the satellite's seams: the core and the agent's data dir.

`FakeCore` is a CoreConnection (satellite/agent.py) over dicts of signed manifests and blob bytes;
signatures are real Ed25519. `MemoryStore` is an AgentStore (the sync logic's PackageStore,
TreeStore and StateStore plus the agent's lock and pinned key) over dicts: it keeps the rules of
the file-system store that orchestration depends on (a download resumes from its partial and is
verified on commit, a rotten blob is deleted when staged, staged packages stay invisible until
published, a tree needs every package unpacked, `current` only names built trees, GC honours
grace, pins and `current`), and records what crossed the seam so tests can count it. Nothing here
touches the disk; the file-system store has its own real-file tests (tests/test_satellite_*.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from satellite.sync import (
    AgentState,
    DeltaBases,
    DeltaOffer,
    Desired,
    StoreGcPolicy,
    StoreGcReport,
    SyncReport,
)
from shared.errors import (
    BlobCorrupt,
    IntegrityError,
    NotFound,
    StoreError,
    Unavailable,
)
from shared.hashing import StreamVerifier
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from shared.signing import public_key_pem, sign_manifest
from shared.zstd_patch import apply_patch, make_patch

CHUNK = 4096
ENV = TargetEnvironment(python_version="3.11")


def fake_package(
    name: str, version: str, size: int = 2000, tag: str = "py3-none-any"
) -> tuple[ManifestEntry, bytes]:
    """A manifest entry and its "wheel" bytes (any bytes do: nothing here unzips them)."""
    seed = f"{name}-{version}-{tag}".encode()
    digests = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    data = b"".join(digests)[:size]
    entry = ManifestEntry(
        name=name,
        version=version,
        filename=f"{name}-{version}-{tag}.whl",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        requested=True,
    )
    return entry, data


def upgraded_package(
    entry: ManifestEntry, data: bytes, version: str, changed: int = 64
) -> tuple[ManifestEntry, bytes]:
    """The next version of a fake package: the same bytes but for `changed` at the end, so a
    patch from the old one is small."""
    new = data[:-changed] + hashlib.sha256(version.encode()).digest() * (changed // 32 + 1)
    new = new[: len(data)]
    name = entry.name
    tag = entry.filename[len(f"{name}-{entry.version}-") : -len(".whl")]
    upgraded = ManifestEntry(
        name=name,
        version=version,
        filename=f"{name}-{version}-{tag}.whl",
        sha256=hashlib.sha256(new).hexdigest(),
        size=len(new),
        requested=entry.requested,
    )
    return upgraded, new


def manifest_of(entries: Sequence[ManifestEntry], sequence: int = 1) -> Manifest:
    return Manifest.build(list(entries), ENV, sequence=sequence)


class FakeCore:
    """CoreConnection over dicts; records every call so tests can count what was pulled.

    `desire(h)` makes the refresh stream send `h`; `gates[h]` holds a manifest request for `h`
    until set, and `asked[h]` is set once it was asked for.
    """

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.manifests: dict[str, Manifest] = {}
        self.blobs: dict[str, bytes] = {}
        self.reports: list[SyncReport] = []
        self.manifest_calls: list[str] = []
        self.downloads: list[tuple[str, int]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: dict[str, asyncio.Event] = {}
        self.subscriptions: list[str] = []  # the current hash sent with each subscribe
        self.closed = False
        self._desired: asyncio.Queue[Desired] = asyncio.Queue()
        self.locations: dict[str, str] = {}  # sha256 -> URL handed out by blob_locations
        self.location_calls: list[list[str]] = []
        self.offers: dict[str, DeltaOffer] = {}  # target sha256 -> what deltas() offers
        self.delta_calls: list[tuple[list[str], list[str]]] = []
        self.delta_waits: list[int | None] = []
        self.deltas_unimplemented = False  # an older core: deltas() answers nothing

    def offer_patch(self, base: bytes, target: bytes, corrupt: bool = False) -> DeltaOffer:
        """Compute a real zstd patch from `base` to `target`, serve it as a blob, offer it.
        `corrupt` flips a byte of the served patch after its sha256 was taken."""
        patch, window_log = make_patch(base, target, level=3)
        sha = hashlib.sha256(patch).hexdigest()
        served = bytearray(patch)
        if corrupt:
            served[len(served) // 2] ^= 0xFF
        self.blobs[sha] = bytes(served)
        offer = DeltaOffer(
            hashlib.sha256(target).hexdigest(),
            hashlib.sha256(base).hexdigest(),
            sha,
            len(patch),
            window_log,
        )
        self.offers[offer.target_sha256] = offer
        return offer

    def publish(self, manifest: Manifest, blobs: dict[str, bytes]) -> Manifest:
        signed = sign_manifest(manifest, self.key)
        self.manifests[signed.lockfile_hash] = signed
        self.blobs.update(blobs)
        return signed

    def desire(self, lockfile_hash: str) -> None:
        self._desired.put_nowait(Desired(lockfile_hash))

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.key.public_key())

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        self.manifest_calls.append(lockfile_hash)
        self.asked.setdefault(lockfile_hash, asyncio.Event()).set()
        if lockfile_hash in self.gates:
            await self.gates[lockfile_hash].wait()
        if lockfile_hash not in self.manifests:
            raise NotFound(f"manifest {lockfile_hash} is unknown to the core")
        return self.manifests[lockfile_hash]

    async def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        self.downloads.append((sha256, offset))
        if sha256 not in self.blobs:
            raise NotFound(f"blob {sha256} is unknown to the core")
        data = self.blobs[sha256]
        for start in range(offset, len(data), CHUNK):
            yield data[start : start + CHUNK]

    async def report(self, report: SyncReport) -> None:
        self.reports.append(report)

    async def blob_locations(self, sha256s: Sequence[str]) -> dict[str, str]:
        self.location_calls.append(list(sha256s))
        return {s: self.locations[s] for s in sha256s if s in self.locations}

    async def deltas(
        self, wanted: Sequence[str], bases: Sequence[str], max_wait_ms: int | None = None
    ) -> dict[str, DeltaOffer]:
        self.delta_calls.append((list(wanted), list(bases)))
        self.delta_waits.append(max_wait_ms)
        if self.deltas_unimplemented:
            return {}
        held = set(bases)
        return {
            s: self.offers[s]
            for s in wanted
            if s in self.offers and self.offers[s].base_sha256 in held
        }

    def refuse(self, reason: str) -> None:
        """Stream `unserved`: no environment of this core fits the satellite."""
        self._desired.put_nowait(Desired("", unserved=reason))

    async def subscribe(self, current_hash: str) -> AsyncIterator[Desired]:
        self.subscriptions.append(current_hash)
        while True:
            yield await self._desired.get()

    async def signing_key_pem(self) -> str:
        return self.public_pem

    async def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class _Staged:
    sha256: str
    entry: ManifestEntry
    replace: bool = False


@dataclass
class _Tree:
    manifest: Manifest
    intact: bool = True
    retired_at: float | None = None


@dataclass
class MemoryStore:
    """AgentStore in dicts; see the module docstring for the rules it keeps."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    partials: dict[str, bytes] = field(default_factory=dict)
    pkgs: dict[str, bool] = field(default_factory=dict)  # sha256 -> intact
    trees: dict[str, _Tree] = field(default_factory=dict)
    current: str | None = None
    state: AgentState = field(default_factory=AgentState)
    pinned_key: str | None = None
    pinned_trees: set[str] = field(default_factory=set)  # trees a script run holds
    fail: dict[str, BaseException] = field(default_factory=dict)  # method -> raised instead
    calls: list[str] = field(default_factory=list)  # every method called, in order
    writes: list[int] = field(default_factory=list)  # bytes per BlobSink.write
    published: list[int] = field(default_factory=list)  # packages per publish_pkgs
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # blob -> (name, version)
    patches: dict[str, bytes] = field(default_factory=dict)  # downloaded, not yet applied
    store_gc_calls: list[StoreGcPolicy] = field(default_factory=list)
    staging: set[str] = field(default_factory=set)  # staged, not yet published
    locked: bool = False

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        failure = self.fail.get(method)
        if failure is not None:
            raise failure

    # -- for tests: damage as a write through a tree's link would ---------------------------

    def damage_pkg(self, sha256: str) -> None:
        self.pkgs[sha256] = False

    def damage_tree(self, lockfile_hash: str) -> None:
        self.trees[lockfile_hash].intact = False

    def tree_hashes(self) -> list[str]:
        return sorted(self.trees)

    # -- PackageStore ----------------------------------------------------------------------

    async def missing_pkgs(self, entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
        self._enter("missing_pkgs")
        return [e for e in entries if e.sha256 not in self.pkgs]

    async def has_blob(self, sha256: str) -> bool:
        self._enter("has_blob")
        return sha256 in self.blobs

    async def open_blob(self, sha256: str, size: int) -> MemorySink:
        self._enter("open_blob")
        return MemorySink(self, sha256, size)

    async def delta_bases(self, entries: Sequence[ManifestEntry]) -> DeltaBases:
        self._enter("delta_bases")
        lacking = [e.sha256 for e in entries if e.sha256 not in self.blobs]
        wanted_names = {e.name for e in entries if e.sha256 not in self.blobs}
        bases = [
            sha
            for sha, (name, _) in sorted(self.names.items())
            if name in wanted_names and sha in self.blobs and sha not in lacking
        ]
        return DeltaBases(tuple(lacking), tuple(bases))

    async def open_patch(self, sha256: str, size: int) -> MemorySink:
        self._enter("open_patch")
        return MemorySink(self, sha256, size, into=self.patches)

    async def apply_patch(
        self, entry: ManifestEntry, offer: DeltaOffer, max_window_log: int
    ) -> None:
        self._enter("apply_patch")
        patch = self.patches.pop(offer.patch_sha256, None)
        base = self.blobs.get(offer.base_sha256)
        if patch is None or base is None:
            raise StoreError("the patch or its base is not on this satellite")
        out: list[bytes] = []
        apply_patch(base, [patch], out.append, max_window_log, entry.size)
        verifier = StreamVerifier(f"blob {entry.sha256}", entry.sha256, entry.size)
        for chunk in out:
            verifier.update(chunk)
        verifier.finish()
        self.blobs[entry.sha256] = b"".join(out)

    async def stage_pkg(self, entry: ManifestEntry, blob_verified: bool = False) -> _Staged | None:
        self._enter("stage_pkg")
        if entry.sha256 in self.pkgs:
            return None
        self._check_blob(entry.sha256, verify=not blob_verified)
        self.names[entry.sha256] = (entry.name, entry.version)
        self.staging.add(entry.sha256)
        return _Staged(entry.sha256, entry)

    def _check_blob(self, sha256: str, verify: bool) -> None:
        data = self.blobs.get(sha256)
        if data is None:
            raise StoreError(f"blob {sha256} is not on this satellite")
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            del self.blobs[sha256]
            raise BlobCorrupt(f"blob {sha256} on disk hashes to something else; deleted it")

    async def publish_pkgs(self, staged: Sequence[object]) -> None:
        self._enter("publish_pkgs")
        self.published.append(len(staged))
        for item in staged:
            assert isinstance(item, _Staged), f"not staged by this store: {item!r}"
            self.staging.discard(item.sha256)
            if item.replace or item.sha256 not in self.pkgs:
                self.pkgs[item.sha256] = True

    async def verify_pkg(self, sha256: str) -> list[str]:
        self._enter("verify_pkg")
        if sha256 not in self.pkgs:
            raise StoreError(f"package {sha256} is not unpacked on this satellite")
        return [] if self.pkgs[sha256] else [f"package {sha256[:12]}: changed a file"]

    async def replace_pkg(self, entry: ManifestEntry) -> None:
        self._enter("replace_pkg")
        try:
            self._check_blob(entry.sha256, verify=True)
        except (IntegrityError, StoreError):
            self.pkgs.pop(entry.sha256, None)
            return
        self.pkgs[entry.sha256] = True

    # -- TreeStore -------------------------------------------------------------------------

    async def current_hash(self) -> str | None:
        self._enter("current_hash")
        return self._current()

    def _current(self) -> str | None:
        return self.current if self.current in self.trees else None

    async def has_tree(self, lockfile_hash: str) -> bool:
        self._enter("has_tree")
        return lockfile_hash in self.trees

    async def assemble_tree(self, manifest: Manifest, replace: bool = False) -> None:
        self._enter("assemble_tree")
        lockfile_hash = manifest.lockfile_hash
        if lockfile_hash in self.trees and not replace:
            raise StoreError(f"tree {lockfile_hash} already exists")
        for entry in manifest.entries:
            if entry.sha256 not in self.pkgs:
                raise StoreError(f"package {entry.sha256} is not unpacked on this satellite")
        self.trees[lockfile_hash] = _Tree(manifest)

    async def tree_manifest(self, lockfile_hash: str) -> Manifest:
        self._enter("tree_manifest")
        if lockfile_hash not in self.trees:
            raise NotFound(f"tree {lockfile_hash} is not on this satellite")
        return self.trees[lockfile_hash].manifest

    async def verify_tree(self, lockfile_hash: str) -> list[str]:
        self._enter("verify_tree")
        tree = self.trees.get(lockfile_hash)
        if tree is None:
            raise NotFound(f"tree {lockfile_hash} is not on this satellite")
        label = f"tree {lockfile_hash[:12]}"
        problems = [] if tree.intact else [f"{label}: extra file intruder.py"]
        for entry in tree.manifest.entries:  # the tree's links lead into pkgs/
            if not self.pkgs.get(entry.sha256, False):
                problems.append(f"{label}: changed a file of {entry.filename}")
        return problems

    async def flip_current(self, lockfile_hash: str) -> None:
        self._enter("flip_current")
        if lockfile_hash not in self.trees:
            raise StoreError(f"cannot flip to tree {lockfile_hash}: it is not built")
        self.trees[lockfile_hash].retired_at = None
        self.current = lockfile_hash

    async def retire_others(self, now: float) -> list[str]:
        self._enter("retire_others")
        current = self._current()
        retired = []
        for lockfile_hash, tree in sorted(self.trees.items()):
            if lockfile_hash != current and tree.retired_at is None:
                tree.retired_at = now
                retired.append(lockfile_hash)
        return retired

    async def gc_trees(self, grace_seconds: float, now: float) -> list[str]:
        self._enter("gc_trees")
        current = self._current()
        removed = []
        for lockfile_hash, tree in sorted(self.trees.items()):
            retired = tree.retired_at
            if lockfile_hash == current or retired is None or now - retired < grace_seconds:
                continue
            if lockfile_hash not in self.pinned_trees:
                del self.trees[lockfile_hash]
                removed.append(lockfile_hash)
        return removed

    async def gc_store(
        self, policy: StoreGcPolicy, grace_seconds: float, now: float
    ) -> StoreGcReport:
        """The file-system store's rules, minus the byte cap: what no tree needs goes, but the
        newest `keep_bases` other versions of each distribution in use stay."""
        self._enter("gc_store")
        self.store_gc_calls.append(policy)
        await self.gc_trees(grace_seconds, now)
        needed = {e.sha256 for t in self.trees.values() for e in t.manifest.entries}
        in_use = {e.name for t in self.trees.values() for e in t.manifest.entries}
        others: dict[str, list[tuple[str, str]]] = {}
        for sha, (name, version) in self.names.items():
            if sha not in needed and name in in_use and sha in self.blobs:
                others.setdefault(name, []).append((version, sha))
        bases = {sha for v in others.values() for _, sha in sorted(v)[-policy.keep_bases :]}
        if policy.keep_bases <= 0:
            bases = set()
        pkgs = [s for s in self.pkgs if s not in needed]
        blobs = [s for s in self.blobs if s not in needed and s not in bases]
        for sha in pkgs:
            del self.pkgs[sha]
        for sha in blobs:
            del self.blobs[sha]
        return StoreGcReport(blobs_removed=len(blobs), pkgs_removed=len(pkgs))

    # -- StateStore ------------------------------------------------------------------------

    async def load_state(self) -> AgentState:
        self._enter("load_state")
        return self.state

    async def save_state(self, state: AgentState) -> None:
        self._enter("save_state")
        self.state = state

    # -- the agent's own needs -------------------------------------------------------------

    @contextlib.contextmanager
    def agent_lock(self) -> Iterator[None]:
        self._enter("agent_lock")
        if self.locked:
            raise StoreError("another agent is using this data dir")
        self.locked = True
        try:
            yield
        finally:
            self.locked = False

    async def cleanup_temp(self) -> int:
        self._enter("cleanup_temp")
        return 0

    async def read_pinned_key(self) -> str | None:
        self._enter("read_pinned_key")
        return self.pinned_key

    async def pin_key(self, pem: str) -> None:
        self._enter("pin_key")
        self.pinned_key = pem


class MemorySink:
    """A BlobSink into MemoryStore.partials; committed bytes move to MemoryStore.blobs."""

    def __init__(
        self,
        store: MemoryStore,
        sha256: str,
        size: int,
        into: dict[str, bytes] | None = None,
    ) -> None:
        self._store = store
        self._into = store.blobs if into is None else into
        self._sha256 = sha256
        self._verifier = StreamVerifier(f"blob {sha256}", sha256, size)
        held = store.partials.get(sha256, b"")
        if len(held) > size:  # cannot be a prefix of the blob: start over
            held = b""
        store.partials[sha256] = held
        self._verifier.update(held)
        self.closed = False

    @property
    def offset(self) -> int:
        return self._verifier.size

    async def write(self, chunks: Sequence[bytes]) -> None:
        assert not self.closed, "write after close"
        self._store.writes.append(sum(len(c) for c in chunks))
        for chunk in chunks:
            try:
                self._verifier.update(chunk)
            except IntegrityError:
                self._store.partials.pop(self._sha256, None)
                raise
            self._store.partials[self._sha256] += chunk

    async def commit(self) -> None:
        try:
            self._verifier.finish()
        except IntegrityError:
            self._store.partials.pop(self._sha256, None)
            raise
        self._into[self._sha256] = self._store.partials.pop(self._sha256)

    def close(self) -> None:
        self.closed = True


class FakeUrls:
    """A UrlSource over a dict of URL -> bytes; `broken` URLs fail after `fail_after` bytes,
    `lying` ones serve other bytes. Records (url, offset) of every fetch."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        self.broken: dict[str, int] = {}  # url -> bytes served before the connection drops
        self.fetches: list[tuple[str, int]] = []

    async def fetch(self, url: str, offset: int) -> AsyncIterator[bytes]:
        self.fetches.append((url, offset))
        if url not in self.content:
            raise Unavailable(f"{url.split('?')[0]} answered HTTP 404")
        data = self.content[url][offset:]
        cut = self.broken.get(url)
        for start in range(0, len(data) if cut is None else min(cut, len(data)), CHUNK):
            yield data[start : start + CHUNK]
        if cut is not None:
            raise Unavailable("connection reset by the CDN")

    async def close(self) -> None:
        pass
