"""A satellite process that only pulls: the agent's own pull path (client, materialiser, blob
writer), timed from the manifest request to the last verified, fsynced, renamed blob.

    python -m scripts.benchlib.pull CORE TOKEN_FILE KEY_FILE DATA_DIR HASH [SHA ...]
    python -m scripts.benchlib.pull --base-url URL CORE ...   # blob bytes over HTTP instead

Prints one JSON line: seconds, bytes, blobs, peak RSS before and after (KiB).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from satellite.client import ClientConfig, GrpcCoreClient
from satellite.http_blobs import HttpBlobs
from satellite.store import AsyncStore, SatelliteStore
from satellite.sync.materialiser import find_sources, pull_blobs
from satellite.sync.results import Progress
from scripts.benchlib.common import rss_kib
from shared.signing import load_public_key_pem, verify_manifest

PULL_CONCURRENCY = 4  # AgentConfig.pull_concurrency's default


async def _main(argv: list[str], base_url: str) -> dict[str, object]:
    core, token, key_pem, data_dir, lockfile_hash, *only = argv
    store = SatelliteStore(Path(data_dir))
    public = load_public_key_pem(key_pem)
    client = GrpcCoreClient(ClientConfig(core, token))
    hwm_before = rss_kib(os.getpid(), "VmHWM")
    try:
        start = time.perf_counter()
        manifest = await client.get_manifest(lockfile_hash)
        verify_manifest(manifest, public)
        entries = [e for e in manifest.entries if not only or e.sha256 in only]
        progress = Progress()
        urls = HttpBlobs() if base_url else None
        sources = await find_sources(entries, client, urls, base_url)
        await pull_blobs(entries, AsyncStore(store), sources, progress, PULL_CONCURRENCY)
        seconds = time.perf_counter() - start
        if urls is not None:
            await urls.close()
            if progress.url_fallbacks:
                raise RuntimeError(f"{progress.url_fallbacks} blobs fell back to the core")
    finally:
        await client.close()
    return {
        "seconds": seconds,
        "bytes": progress.bytes_pulled,
        "blobs": progress.blobs_pulled,
        "hwm_before_kib": hwm_before,
        "hwm_kib": rss_kib(os.getpid(), "VmHWM"),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    base = ""
    if args[0] == "--base-url":
        base, args = args[1], args[2:]
    args[1] = Path(args[1]).read_text().strip()  # token file -> token
    args[2] = Path(args[2]).read_text()  # key file -> PEM
    print(json.dumps(asyncio.run(_main(args, base))), flush=True)
