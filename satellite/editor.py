"""`spk-satellite env --paths`: what an editor on this host indexes: what scripts import.

Scripts run with `python -I -S` and only the current tree's site-packages on sys.path
(satellite/runner.py), so that directory and this interpreter are all an editor needs:

    pyright / basedpyright     "extraPaths": [<site_packages>] in pyrightconfig.json
    VS Code (Pylance)          python.analysis.extraPaths, or the interpreter below
    PyCharm                    the interpreter below, the path added as a content root

`site_packages` is the tree itself (trees/<hash>/site-packages: immutable, named by its hash);
`current_site_packages` goes through the `current` link and follows every flip, for editor
settings written once.
"""

from __future__ import annotations

import json
import platform
import sys

from satellite.runner import resolve
from satellite.store import SatelliteStore
from shared.errors import FailedPrecondition


def editor_paths(store: SatelliteStore, python: str = sys.executable) -> dict[str, object]:
    resolution = resolve(store)
    current = resolution.current_hash
    if current is None:
        raise FailedPrecondition(
            f"no tree is current in {store.root} yet: the agent has not synced (see"
            " `spk-satellite status`)"
        )
    return {
        "lockfile_hash": current,
        "state": resolution.state,  # "ready", or "not_ready" while the agent syncs another
        "site_packages": str(store.tree_site(current).absolute()),
        "current_site_packages": str((store.root / "current" / "site-packages").absolute()),
        "interpreter": python,
        "interpreter_flags": ["-I", "-S"],  # what `spk-satellite run` starts scripts with
        "python_version": platform.python_version(),
        "implementation": sys.implementation.name,
    }


def print_paths(store: SatelliteStore, as_json: bool) -> None:
    paths = editor_paths(store)
    if as_json:
        print(json.dumps(paths, indent=2, sort_keys=True))
        return
    if paths["state"] != "ready":
        print(f"note: {resolve(store).message}", file=sys.stderr)
    print(paths["site_packages"])
