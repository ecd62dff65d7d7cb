"""The committed stubs under shared/proto/ match protos/ (regenerate with scripts/gen-protos)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        [str(ROOT / "scripts/gen-protos"), str(out)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    committed = ROOT / "shared" / "proto"
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    current = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(k) for k in fresh.keys() | current.keys() if fresh.get(k) != current.get(k))
    assert not stale, f"stale generated stubs, run scripts/gen-protos: {stale}"
