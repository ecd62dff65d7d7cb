"""The satellite's sync logic, pure: no file, no thread, no socket (import contract + a test).

    ports.py         the async Protocols it runs over (BlobSource, PackageStore, TreeStore,
                     StateStore), ReconcileDeps, and the plain data crossing them (AgentState,
                     SyncReport, Desired)
    results.py       Outcome, ReconcileResult, Progress
    materialiser.py  pull missing blobs (resuming; as patches where the core has them),
                     unpack, publish in groups
    deltas.py        which blobs come as patches, and their fallback to the whole blob
    reconciler.py    reconcile_to_hash (verify, materialise, assemble, flip, GC) and repair_tree
    worker.py        Reconciler: the one worker task, coalescing requests to the newest hash

The file-system side lives in satellite/store/ (AsyncStore implements the store Protocols);
the gRPC side in satellite/client.py. Tests drive this package with fakes (tests/fakes.py).
"""

from satellite.sync.ports import (
    DEFAULT_MAX_WINDOW_LOG,
    DEFAULT_TREE_GRACE_SECONDS,
    AgentState,
    BlobSource,
    DeltaBases,
    DeltaOffer,
    Desired,
    PackageStore,
    ReconcileDeps,
    StateStore,
    StoreGcPolicy,
    StoreGcReport,
    SyncReport,
    SyncStatus,
    TreeStore,
    UrlSource,
)
from satellite.sync.reconciler import reconcile_to_hash, repair_tree
from satellite.sync.results import Outcome, ReconcileResult
from satellite.sync.worker import Reconciler

__all__ = [
    "DEFAULT_MAX_WINDOW_LOG",
    "DEFAULT_TREE_GRACE_SECONDS",
    "AgentState",
    "BlobSource",
    "DeltaBases",
    "DeltaOffer",
    "Desired",
    "Outcome",
    "PackageStore",
    "ReconcileDeps",
    "ReconcileResult",
    "Reconciler",
    "StateStore",
    "StoreGcPolicy",
    "StoreGcReport",
    "SyncReport",
    "SyncStatus",
    "TreeStore",
    "UrlSource",
    "reconcile_to_hash",
    "repair_tree",
]
