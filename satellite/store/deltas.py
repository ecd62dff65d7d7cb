"""Binary deltas on the data dir: candidate bases for a request, and applying a patch.

A patch (downloaded and verified against its own sha256 into `blobs/.patches/`) is decoded
against its base blob in a worker thread, streaming into a BlobWriter for the wanted blob: the
writer hashes while writing and its commit() checks size and sha256 against the manifest entry,
exactly as for a download. The writer has its own partial (`.partial/<sha>.patched`), so a failed
apply never leaves bytes that a later whole-blob download would resume from. Memory: the base is
read whole (the decoder references it) plus zstd's window, at most 2**max_window_log bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import BinaryIO

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from satellite.store.blobs import BlobDir
from satellite.sync.ports import DeltaBases, DeltaOffer
from shared.errors import IntegrityError, StoreError
from shared.hashing import READ_CHUNK
from shared.manifest import ManifestEntry
from shared.zstd_patch import apply_patch, patch_base

BASES_PER_DISTRIBUTION = 3  # nearest versions first; the core picks among them


def delta_bases(blobs: BlobDir, entries: list[ManifestEntry]) -> DeltaBases:
    """Of `entries`, the blobs not held, and held blobs of other versions of the same names."""
    lacking = [e for e in entries if not blobs.has(e.sha256)]
    if not lacking:
        return DeltaBases()
    names = {canonicalize_name(e.name) for e in lacking}
    skip = {e.sha256 for e in lacking}
    by_name: dict[str, list[tuple[Version, str]]] = {}
    for sha, info in blobs.catalog().items():
        if info.name in names and sha not in skip:
            by_name.setdefault(info.name, []).append((_version(info.version), sha))
    bases: list[str] = []
    for held in by_name.values():
        held.sort(reverse=True)
        bases.extend(sha for _, sha in held[:BASES_PER_DISTRIBUTION])
    return DeltaBases(tuple(e.sha256 for e in lacking), tuple(bases))


def _version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        return Version("0")


def apply(blobs: BlobDir, entry: ManifestEntry, offer: DeltaOffer, max_window_log: int) -> None:
    """Make `entry`'s blob from `offer`'s base and its downloaded patch; the patch goes either
    way. IntegrityError (PatchError) or StoreError on any failure, nothing of it kept."""
    patch = blobs.patch_path(offer.patch_sha256)
    try:
        try:  # only zstd's copy stays: the bytes read are a temporary
            base = patch_base(blobs.path(offer.base_sha256).read_bytes())
        except FileNotFoundError:
            raise StoreError(f"the base blob {offer.base_sha256} is gone") from None
        if not patch.is_file():
            raise StoreError(f"the patch {offer.patch_sha256} was not downloaded")
        writer = blobs.open_patched_writer(entry.sha256, entry.size)
        try:
            with patch.open("rb") as f:
                apply_patch(base, _chunks(f), writer.write, max_window_log, entry.size)
            writer.commit()  # size and sha256 against the signed manifest's entry
        except BaseException:
            writer.discard()
            raise
        finally:
            writer.close()
    except IntegrityError as exc:
        raise IntegrityError(f"{entry.filename} from a patch: {exc.message}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            patch.unlink()
    blobs.note(entry)


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(READ_CHUNK):
        yield chunk
