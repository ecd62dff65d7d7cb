"""Schema migration 3's data step: a core from before environments keeps serving its history.

The environment every existing lockfile was resolved for becomes the first (default)
environment, and every lockfile a release of its own under its sequence, so the desired hash,
rollback and GC carry on without a re-install and agents see the same hash as before.
"""

from __future__ import annotations

import json

from core.state.db import (
    EnvironmentRow,
    InstallStateRow,
    Lockfile,
    Release,
    ReleaseManifest,
    Setting,
)
from core.state.environments import DEFAULT_NAME, insert_environment, native_target
from shared.environments import Environment
from shared.manifest import Manifest, TargetEnvironment

REGISTRY_KEY = "registry"


def _old_target() -> TargetEnvironment:
    """What the previous core resolved for: the desired manifest's environment if there is one
    (exact, whatever the config says since), else the configured target, else its own."""
    state = InstallStateRow.get_or_none(InstallStateRow._meta.primary_key == 1)
    desired = state.lockfile_hash if state is not None else ""
    row = Lockfile.get_or_none(Lockfile.lockfile_hash == desired) if desired else None
    if row is not None:
        return Manifest.from_json(row.manifest_json).environment
    setting = Setting.get_or_none(Setting.key == REGISTRY_KEY)
    raw = json.loads(setting.value).get("target") if setting is not None else None
    return TargetEnvironment(**raw) if raw else native_target()


def first_environment_from_history() -> None:
    if EnvironmentRow.select().exists():
        return
    insert_environment(Environment(DEFAULT_NAME, _old_target()), position=0)
    for row in Lockfile.select():
        Release.insert(
            sequence=row.sequence, created_at=row.created_at
        ).on_conflict_ignore().execute()
        ReleaseManifest.insert(
            sequence=row.sequence, environment=DEFAULT_NAME, lockfile_hash=row.lockfile_hash
        ).on_conflict_ignore().execute()
        Lockfile.update(environment=DEFAULT_NAME).where(
            Lockfile.lockfile_hash == row.lockfile_hash
        ).execute()
    state = InstallStateRow.get_or_none(InstallStateRow._meta.primary_key == 1)
    if state is not None and state.lockfile_hash:
        desired = Lockfile.get_or_none(Lockfile.lockfile_hash == state.lockfile_hash)
        if desired is not None:
            InstallStateRow.update(desired_sequence=desired.sequence).where(
                InstallStateRow._meta.primary_key == 1
            ).execute()
