"""The install state row: status, phase, progress and per-environment results (sync, DB thread)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.state.db import InstallStateRow, now


@dataclass
class EnvProgress:
    """One environment's part of an install: pending -> resolving -> fetching -> built -> ready;
    error (this environment failed) or cancelled (another one did, before this one finished)."""

    name: str
    status: str
    lockfile_hash: str = ""
    wheels: int = 0
    total_bytes: int = 0
    error: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InstallState:
    status: str
    lockfile_hash: str  # the default environment's desired hash
    attempted_hash: str
    started_at: int
    finished_at: int
    total_bytes: int
    warnings: tuple[str, ...]
    error: str
    phase: str
    wheels_done: int
    wheels_total: int
    environments: tuple[EnvProgress, ...] = ()
    release_sequence: int = 0


def _state_from_row(row: InstallStateRow) -> InstallState:
    envs = tuple(EnvProgress(**raw) for raw in json.loads(row.environments_json or "[]"))
    return InstallState(
        row.status,
        row.lockfile_hash,
        row.attempted_hash,
        row.started_at,
        row.finished_at,
        row.total_bytes,
        tuple(json.loads(row.warnings_json)),
        row.error,
        row.phase,
        row.wheels_done,
        row.wheels_total,
        envs,
        int(row.desired_sequence),
    )


def read_state() -> InstallState:
    return _state_from_row(InstallStateRow.get_by_id(1))


def update_state(**fields: object) -> InstallState:
    if "warnings" in fields:
        fields["warnings_json"] = json.dumps(list(fields.pop("warnings")))  # type: ignore[call-overload]
    if "environments" in fields:
        envs = fields.pop("environments")
        fields["environments_json"] = json.dumps([dataclasses.asdict(e) for e in envs])  # type: ignore[attr-defined]
    InstallStateRow.update(**fields).where(InstallStateRow._meta.primary_key == 1).execute()
    return read_state()


def recover_stale_install() -> bool:
    """At startup: an install left `installing` by a crashed core is marked failed."""
    row = InstallStateRow.get_by_id(1)
    if row.status != "installing":
        return False
    update_state(
        status="error",
        finished_at=now(),
        phase="",
        error="the core stopped during this install; the previous release stays."
        " Run InstallNow again.",
    )
    return True


def remove_stale_work(work_dir: Path) -> list[str]:
    """At startup: delete what a killed install left in its work dir (not this process's).

    `resolve-*` is the resolver's scratch, whose netrc holds the registry token in plaintext;
    `dl-*` hold downloads while they are checked. Their cleanups never ran under SIGKILL.
    """
    removed: list[str] = []
    for path in [*work_dir.glob("resolve-*"), *work_dir.glob("dl-*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
