"""The satellite's file-system store: the data dir, its blobs, packages and trees.

data_dir.py     SatelliteStore: layout, agent lock, `current`, state, housekeeping (sync)
blobs.py        verified blobs and resumable downloads
pkgs.py         unpacked wheels, batched durable publishing
trees.py        install trees assembled by links, pins, retirement, GC
async_store.py  AsyncStore: SatelliteStore behind satellite.sync's async Protocols, in
                worker threads; a full disk becomes shared.errors.DiskFull here
unpack_pool.py  extraction in worker processes (one pool per process)
"""

from satellite.store.async_store import AsyncStore
from satellite.store.data_dir import SatelliteStore
from satellite.store.trees import TreePin

__all__ = ["AsyncStore", "SatelliteStore", "TreePin"]
