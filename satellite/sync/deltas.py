"""Binary deltas, satellite side: which wanted blobs come as patches, and the fallback.

One question per sync (GetDeltas): "I lack these blobs; I hold these other versions of the same
distributions". For each offer the patch is fetched like any blob (resumable, verified against
its own sha256 and size, from a URL where it has one), then the store applies it to the base and
verifies the result against the signed manifest's size and sha256 before anything else uses it:
a patch is only a transport. Any failure (the core has no GetDeltas, a patch that does not
verify, a base gone or rotten, a result that does not match) is logged and the whole blob is
pulled instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from satellite.sync.fetch import BlobRef, Sources, fetch_blob
from satellite.sync.ports import BlobSource, DeltaOffer, PackageStore
from satellite.sync.results import Progress
from shared.errors import SpkError
from shared.manifest import ManifestEntry

log = logging.getLogger(__name__)


async def find_deltas(
    missing: Sequence[ManifestEntry],
    store: PackageStore,
    core: BlobSource,
    max_window_log: int,
    wait: Callable[[int], int | None] = lambda _bytes: None,
) -> tuple[list[ManifestEntry], dict[str, DeltaOffer]]:
    """(the entries whose blob is not held, the usable offers for them by target sha256).
    `wait(wheel_bytes)`: how long the core may wait for patches being computed (None: its own
    default), given the bytes of wheels they would replace."""
    if not missing:
        return [], {}
    held = await store.delta_bases(missing)
    lacking = set(held.lacking)
    to_fetch = [e for e in missing if e.sha256 in lacking]
    if not to_fetch or not held.bases:
        return to_fetch, {}
    try:
        wait_ms = wait(sum(e.size for e in to_fetch))
        offers = await core.deltas([e.sha256 for e in to_fetch], list(held.bases), wait_ms)
    except SpkError as exc:
        log.warning("asking the core for deltas failed (%s); pulling whole wheels", exc)
        return to_fetch, {}
    bases = set(held.bases)
    sizes = {e.sha256: e.size for e in to_fetch}
    usable: dict[str, DeltaOffer] = {}
    for target, offer in offers.items():
        if target not in sizes or offer.base_sha256 not in bases:
            continue  # not what we asked for: ignore it
        if offer.window_log > max_window_log:
            log.info(
                "the patch for %s needs a 2**%d window, above this satellite's 2**%d;"
                " pulling the whole wheel",
                target[:12],
                offer.window_log,
                max_window_log,
            )
            continue
        if 0 < offer.patch_size < sizes[target]:
            usable[target] = offer
    return to_fetch, usable


async def pull_via_patch(
    entry: ManifestEntry,
    offer: DeltaOffer,
    store: PackageStore,
    sources: Sources,
    progress: Progress,
) -> bool:
    """Make `entry`'s blob from a patch; False (logged: the caller pulls the whole blob)."""
    ref = BlobRef(offer.patch_sha256, offer.patch_size, f"patch for {entry.filename}")
    try:
        await fetch_blob(ref, store.open_patch, sources, progress)
        await store.apply_patch(entry, offer, sources.max_window_log)
    except SpkError as exc:
        log.warning(
            "delta for %s (patch %s from blob %s) failed: %s; falling back to the whole wheel",
            entry.filename,
            offer.patch_sha256[:12],
            offer.base_sha256[:12],
            exc,
        )
        return False
    return True
