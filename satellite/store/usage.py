"""What the data dir holds on disk, for the agent's metrics (blocking: run it in a thread)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from satellite.store.data_dir import SatelliteStore
from shared.errors import NotFound, StoreError


@dataclass(frozen=True)
class DiskUsage:
    areas: dict[str, int] = field(default_factory=dict)  # blobs | pkgs | trees -> bytes
    current_tree_bytes: int = 0
    trees: int = 0


def _regular_bytes(root: str, seen: set[tuple[int, int]]) -> int:
    """Apparent size of the regular files under `root`, each inode once; symlinks not followed
    (a tree is mostly links into pkgs/, which pkgs/ already counts)."""
    total = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:  # vanished (GC) or unreadable: count what can be seen
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        total += st.st_size
            except OSError:
                continue
    return total


def disk_usage(store: SatelliteStore) -> DiskUsage:
    seen: set[tuple[int, int]] = set()
    areas = {
        "blobs": _regular_bytes(str(store.blobs.root), seen),
        "pkgs": _regular_bytes(str(store.pkgs.root), seen),
        "trees": _regular_bytes(str(store.trees.root), seen),
    }
    tree_bytes = 0
    current = store.current_hash()
    if current is not None:
        with contextlib.suppress(NotFound, StoreError, OSError):
            tree_bytes = store.tree_size_bytes(current)
    return DiskUsage(areas, tree_bytes, len(store.trees.hashes()))
