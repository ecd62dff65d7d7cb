"""The admin's target environments (rows). Sync functions, run through Database.run.

The list only shapes the NEXT install: satellites are matched against the environments of the
desired release (core/fanout/hub.py), so adding or removing one takes effect when it is
installed, never half-way. The first environment is the default: it serves agents that do not
describe their host (agents older than environments).
"""

from __future__ import annotations

import sys

import peewee as pw

from core.state.db import EnvironmentRow, database_proxy
from shared.environments import Environment, validate_environment
from shared.errors import FailedPrecondition, InvalidArgument
from shared.manifest import TargetEnvironment

DEFAULT_NAME = "default"


def native_target() -> TargetEnvironment:
    """The core's own interpreter; platform empty = the core's own platform."""
    major, minor = sys.version_info[:2]
    return TargetEnvironment(f"{major}.{minor}", "cp", f"cp{major}{minor}", "")


def _from_row(row: EnvironmentRow) -> Environment:
    target = TargetEnvironment(row.python_version, row.implementation, row.abi, row.platform)
    return Environment(str(row.name), target)


def list_environments() -> list[Environment]:
    rows = EnvironmentRow.select().order_by(EnvironmentRow.position, EnvironmentRow.name)
    return [_from_row(r) for r in rows]


def ensure_default() -> list[Environment]:
    """A new core serves its own interpreter, exactly as before environments existed."""
    with database_proxy.atomic():
        if not EnvironmentRow.select().exists():
            insert_environment(Environment(DEFAULT_NAME, native_target()), position=0)
        return list_environments()


def _fields(target: TargetEnvironment) -> dict[str, str]:
    return {
        "python_version": target.python_version,
        "implementation": target.implementation,
        "abi": target.abi,
        "platform": target.platform,
    }


def insert_environment(env: Environment, position: int) -> None:
    EnvironmentRow.insert(name=env.name, position=position, **_fields(env.target)).execute()


def _update(env: Environment) -> None:
    EnvironmentRow.update(**_fields(env.target)).where(EnvironmentRow.name == env.name).execute()


def add_environment(name: str, target: TargetEnvironment) -> Environment:
    """Upsert by name; a target another environment already has is refused (same manifest)."""
    env = validate_environment(name, target)
    with database_proxy.atomic():
        for other in list_environments():
            if other.name != env.name and other.target == env.target:
                raise InvalidArgument(
                    "environment",
                    f"{other.name!r} already has this target ({env.describe()}); one name each",
                )
        row = EnvironmentRow.get_or_none(EnvironmentRow.name == env.name)
        if row is None:
            top = EnvironmentRow.select(pw.fn.MAX(EnvironmentRow.position)).scalar()
            insert_environment(env, position=(top or 0) + 1)
        else:
            _update(env)
    return env


def remove_environment(name: str) -> bool:
    """False for an unknown name (like RemovePackage); the last one cannot go."""
    with database_proxy.atomic():
        if EnvironmentRow.get_or_none(EnvironmentRow.name == name) is None:
            return False
        if EnvironmentRow.select().count() == 1:
            raise FailedPrecondition(
                f"{name!r} is the only environment; add another before removing it"
            )
        EnvironmentRow.delete().where(EnvironmentRow.name == name).execute()
    return True


def set_default_target(target: TargetEnvironment | None) -> Environment:
    """SetRegistryConfig's `target` (kept for older clients): the default environment's target;
    None puts it back to the core's own interpreter."""
    with database_proxy.atomic():
        default = ensure_default()[0]
        if target is None:
            env = Environment(default.name, native_target())
        else:
            env = validate_environment(default.name, target, field="target")
        _update(env)
    return env
