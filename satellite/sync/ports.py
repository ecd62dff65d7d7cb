"""The seams of the sync logic: four small async Protocols and the plain data that crosses them.

    BlobSource     the core: manifests, blob bytes, deltas, sync reports (satellite/client.py)
    PackageStore   blobs and unpacked packages: has, pull into, patch, stage, publish, verify
    TreeStore      install trees and `current`: has, assemble, flip, retire, GC, verify
    StateStore     the agent's memory between runs (AgentState)

The three stores are implemented for real by satellite.store.AsyncStore, the one adapter that
owns worker threads and the file system; the tests drive the sync logic with in-memory fakes
(tests/fakes.py). Nothing here names a path or a file: a store's tokens (`Staged`) are opaque,
and its failures arrive as shared.errors types (a full disk is DiskFull, a rotten blob
BlobCorrupt). Generated protobuf types never cross these seams either.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from shared.manifest import Manifest, ManifestEntry

DEFAULT_TREE_GRACE_SECONDS = 3600.0  # longer than any script run; pins protect longer ones
DEFAULT_MAX_WINDOW_LOG = 27  # the largest zstd window a patch may ask for (128 MiB)


class SyncStatus(Enum):
    SYNCING = "syncing"
    READY = "ready"
    ERROR = "error"


@dataclass(frozen=True)
class SyncReport:
    lockfile_hash: str
    status: SyncStatus
    error: str = ""
    blobs_pulled: int = 0
    bytes_pulled: int = 0
    duration_ms: int = 0
    current_hash: str = ""
    wheel_bytes: int = 0  # the wheels the pulls produced (bytes_pulled: what crossed the wire)
    patches_used: int = 0
    patch_fallbacks: int = 0


@dataclass(frozen=True)
class DeltaOffer:
    """The core's offer for one wanted blob: a patch blob that turns a held blob into it."""

    target_sha256: str
    base_sha256: str
    patch_sha256: str
    patch_size: int
    window_log: int


@dataclass(frozen=True)
class DeltaBases:
    """What a store can say for a delta request: the blobs it lacks, and the blobs it holds that
    are other versions of the same distributions (candidate bases), both as sha256s."""

    lacking: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoreGcPolicy:
    """Satellite store GC (blobs/ and pkgs/; trees have their own grace and pins)."""

    enabled: bool = True
    keep_bases: int = 1  # newest other versions of each distribution kept as delta bases
    max_store_bytes: int = 0  # 0: no cap; else evict the oldest unneeded entries past it
    interval_seconds: float = 3600.0  # a scheduled pass besides the one after each flip; 0: off


@dataclass(frozen=True)
class StoreGcReport:
    blobs_removed: int = 0
    pkgs_removed: int = 0
    trees_evicted: int = 0  # retired trees still within grace, removed for the byte cap
    bytes_freed: int = 0
    store_bytes: int = 0  # blobs + pkgs after the pass
    over_cap: bool = False  # what must stay (current, pinned) alone exceeds max_store_bytes


@dataclass(frozen=True)
class Desired:
    """One message of the refresh stream: what the core wants this satellite to run."""

    lockfile_hash: str  # "": nothing desired (unless unserved)
    environment: str = ""  # the core's environment serving this host ("" from an older core)
    sequence: int = 0  # the release it belongs to
    unserved: str = ""  # non-empty: no environment fits this host; keep the current tree


@dataclass(frozen=True)
class AgentState:
    """What the agent remembers between runs; the runner reads it to know what is desired."""

    desired_hash: str | None = None  # None: never heard from the core; "": nothing desired
    status: str = ""  # a SyncStatus value of the last reconcile
    error: str = ""  # the last reconcile's error, "" when it succeeded
    highest_sequence: int = 0  # highest manifest sequence ever flipped to (rollback guard)
    pull_bytes_per_second: float = 0.0  # this host's measured pull rate (0: not yet measured)
    updated_at_unix: float = 0.0


class BlobSource(Protocol):
    """What a reconcile needs from the core (5 methods). The gRPC adapter: satellite/client.py."""

    async def get_manifest(self, lockfile_hash: str) -> Manifest:
        """The signed manifest; raises shared.errors.NotFound for an unknown hash."""
        ...

    def download_blob(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` on, in chunks; NotFound for an unknown blob."""
        ...

    async def report(self, report: SyncReport) -> None: ...

    async def blob_locations(self, sha256s: Sequence[str]) -> dict[str, str]:
        """URLs (presigned object-store GETs, a CDN) for blobs the core does not have to stream
        itself; {} when it offers none (or is older than this call)."""
        ...

    async def deltas(
        self, wanted: Sequence[str], bases: Sequence[str], max_wait_ms: int | None = None
    ) -> dict[str, DeltaOffer]:
        """Patches for `wanted` blobs from `bases` this satellite holds, by target sha256; {}
        when the core has none (or is older than this call). `max_wait_ms`: how long the core
        may wait for patches still being computed (None: the core's own default)."""
        ...


class UrlSource(Protocol):
    """Blob bytes from a URL, without the core (1 method). Adapter: satellite/http_blobs.py."""

    def fetch(self, url: str, offset: int) -> AsyncIterator[bytes]:
        """The bytes from `offset` on (a Range request); SpkError on any failure. Never sends
        the satellite's token; errors name the host, never a presigned query."""
        ...


class BlobSink(Protocol):
    """One resumable blob download into the store (3 methods and the resume offset)."""

    @property
    def offset(self) -> int:
        """Bytes already held (a partial from an earlier attempt): the download resumes here."""
        ...

    async def write(self, chunks: Sequence[bytes]) -> None:
        """Append `chunks` in order, hashing them. Each call may cost a hop to a worker thread,
        so callers hand over batches, not single chunks. IntegrityError past the blob's size."""
        ...

    async def commit(self) -> None:
        """Check size and sha256, then publish the blob durably. IntegrityError on a mismatch
        (the partial is deleted: it cannot be trusted for a resume either)."""
        ...

    def close(self) -> None:
        """Release the download; an uncommitted partial stays for the next resume. Synchronous
        and short (at most one batch write still finishing): it runs during cancellation."""
        ...


class Staged(Protocol):
    """A package unpacked out of sight, waiting for `PackageStore.publish_pkgs`. Opaque: only
    the store that staged it looks inside."""

    @property
    def sha256(self) -> str: ...


class PackageStore(Protocol):
    """Verified blobs and unpacked packages, keyed by the blob's sha256 (10 methods)."""

    async def missing_pkgs(self, entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
        """Those of `entries` not unpacked yet, in order: one look for the whole set."""
        ...

    async def has_blob(self, sha256: str) -> bool: ...

    async def open_blob(self, sha256: str, size: int) -> BlobSink:
        """Start (or resume) downloading a blob of `size` bytes."""
        ...

    async def delta_bases(self, entries: Sequence[ManifestEntry]) -> DeltaBases:
        """Of `entries`, the blobs not held, and held blobs of the same distributions."""
        ...

    async def open_patch(self, sha256: str, size: int) -> BlobSink:
        """Start (or resume) downloading a patch blob; commit() checks its own size and sha."""
        ...

    async def apply_patch(
        self, entry: ManifestEntry, offer: DeltaOffer, max_window_log: int
    ) -> None:
        """Make `entry`'s blob from its base and the downloaded patch, verified against the
        entry's size and sha256 exactly like a download. The patch is deleted either way;
        IntegrityError (or StoreError) on any failure, and nothing of the result is kept."""
        ...

    async def stage_pkg(self, entry: ManifestEntry, blob_verified: bool = False) -> Staged | None:
        """Unpack out of sight (None: already unpacked); `publish_pkgs` makes it visible.

        `blob_verified`: the blob was hashed while it was written just now, so it is not read
        once more; otherwise it is re-verified first (disks rot) and BlobCorrupt deletes it.
        """
        ...

    async def publish_pkgs(self, staged: Sequence[Staged]) -> None:
        """Make staged packages durable and visible together (one durability sync per batch)."""
        ...

    async def verify_pkg(self, sha256: str) -> list[str]:
        """Problems of an unpacked package against what was recorded at unpack time."""
        ...

    async def replace_pkg(self, entry: ManifestEntry) -> None:
        """Drift repair: swap in a fresh copy from the blob so trees never see it missing; with
        no good blob, discard the package (the next materialise pulls it)."""
        ...


class TreeStore(Protocol):
    """Install trees and the `current` pointer (9 methods)."""

    async def current_hash(self) -> str | None:
        """The hash `current` names, or None when it is missing, foreign or dangling."""
        ...

    async def has_tree(self, lockfile_hash: str) -> bool: ...

    async def assemble_tree(self, manifest: Manifest, replace: bool = False) -> None:
        """Build the tree from unpacked packages (all must be); `replace` swaps out an existing
        one (drift repair). Clashing files are refused naming both wheels."""
        ...

    async def tree_manifest(self, lockfile_hash: str) -> Manifest:
        """The manifest a tree was built from, read offline."""
        ...

    async def verify_tree(self, lockfile_hash: str) -> list[str]: ...

    async def flip_current(self, lockfile_hash: str) -> None:
        """Point `current` at a built tree atomically; it stops being retired."""
        ...

    async def retire_others(self, now: float) -> list[str]:
        """Mark every tree but the current one retired at `now`, unless it already is."""
        ...

    async def gc_trees(self, grace_seconds: float, now: float) -> list[str]:
        """Delete trees retired longer than the grace and not pinned by a run; never current."""
        ...

    async def gc_store(
        self, policy: StoreGcPolicy, grace_seconds: float, now: float
    ) -> StoreGcReport:
        """Delete blobs and packages no tree on disk needs (but keep delta bases), and under
        `max_store_bytes` evict the oldest of what is only kept, never what `current` or a
        pinned run uses. Runs only where no reconcile can (the reconcile worker)."""
        ...


class StateStore(Protocol):
    """The agent's state between runs (2 methods)."""

    async def load_state(self) -> AgentState:
        """The saved state; AgentState() when there is none yet (or it was unreadable)."""
        ...

    async def save_state(self, state: AgentState) -> None:
        """Replace the saved state atomically: a failed save keeps the old one whole."""
        ...


@dataclass(frozen=True)
class ReconcileDeps:
    """Everything a reconcile may touch. Tests pass fakes; the agent passes the real things
    (one satellite.store.AsyncStore serves as `pkgs`, `trees` and `state`)."""

    pkgs: PackageStore
    trees: TreeStore
    state: StateStore
    core: BlobSource
    verify_manifest: Callable[[Manifest], None]  # signature check; raises IntegrityError
    # Which wheel files cannot run here, and how to name this interpreter in the refusal
    # (shared.tags on a satellite; passed in because they probe the running interpreter).
    unsupported_wheels: Callable[[Iterable[str]], list[str]]
    describe_interpreter: Callable[[], str]
    unpack_concurrency: int  # the agent passes the CPU count: unpacking is CPU and disk bound
    pull_concurrency: int = 4
    # Fetching blobs without the core: where from (None: always the core), and a mirror or CDN
    # of the blob store this host prefers (<base>/ab/<sha256>.whl) over asking the core.
    urls: UrlSource | None = None
    blob_base_url: str = ""
    wall_clock: Callable[[], float] = time.time  # retirement marks and GC
    monotonic: Callable[[], float] = time.monotonic  # durations
    tree_grace_seconds: float = DEFAULT_TREE_GRACE_SECONDS
    # Binary deltas: ask the core for patches from blobs held here (False: whole blobs only,
    # as agents before GetDeltas did); a patch needing a larger zstd window is refused.
    deltas: bool = True
    max_window_log: int = DEFAULT_MAX_WINDOW_LOG
    # How long the core may wait for patches being computed: None measures the link (see
    # satellite/sync/link_rate.py), a number fixes it (seconds; the core caps it at its own).
    delta_wait_seconds: float | None = None
    store_gc: StoreGcPolicy = StoreGcPolicy()
