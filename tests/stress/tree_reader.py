"""A script that reads the current tree in a loop, the way a run does, and counts what it misses.

    python -m tests.stress.tree_reader DATA_DIR EXPECTED_JSON RESULT_JSON STOP_FILE

Each pass resolves `current` once, pins that tree (the runner's shared flock, through the same
store API), then opens and hashes every file the tree's manifest says it holds. A missing or
changed file, or a `current` that does not resolve once it has, is a violation. Losing the pin
race to tree GC (NotFound while `current` already names another tree) is the documented retry,
not a violation. Runs until STOP_FILE exists, then writes its counts to RESULT_JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from satellite.store import SatelliteStore
from shared.errors import NotFound


def main(data_dir: str, expected_json: str, result_json: str, stop_file: str) -> int:
    store = SatelliteStore(Path(data_dir))
    expected: dict[str, dict[str, str]] = json.loads(Path(expected_json).read_text())
    stop = Path(stop_file)
    passes = files_read = pin_retries = 0
    violations: list[str] = []
    seen_current = False
    while not stop.exists():
        lockfile_hash = store.current_hash()
        if lockfile_hash is None:
            if seen_current:
                violations.append(f"{time.time():.3f} current does not resolve")
            time.sleep(0.01)
            continue
        seen_current = True
        files = expected.get(lockfile_hash)
        if files is None:
            violations.append(f"current names an unknown tree {lockfile_hash}")
            continue
        try:
            with store.pin_tree(lockfile_hash) as pin:
                for rel, sha in files.items():
                    try:
                        data = (pin.site / rel).read_bytes()
                    except OSError as exc:
                        violations.append(f"{lockfile_hash[:12]} {rel}: {exc.strerror}")
                        continue
                    files_read += 1
                    if hashlib.sha256(data).hexdigest() != sha:
                        violations.append(f"{lockfile_hash[:12]} {rel}: content changed")
        except NotFound:
            if store.current_hash() == lockfile_hash:
                violations.append(f"{lockfile_hash[:12]} vanished while still current")
            pin_retries += 1
            continue
        passes += 1
        time.sleep(0.005)  # leave the agent some CPU on a 2-core machine
    result = {
        "passes": passes,
        "files_read": files_read,
        "pin_retries": pin_retries,
        "violations": len(violations),
        "first_violations": violations[:20],
    }
    Path(result_json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
