"""The pinned allowlist: validation rules and its rows. Sync functions, run via Database.run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.state.db import AllowlistPackage, database_proxy, now
from shared.errors import InvalidArgument, NotFound
from shared.names import exact_version, normalize_name

MAX_ALLOWLIST = 2_000


@dataclass(frozen=True)
class PackageSpec:
    name: str
    version: str
    enabled: bool | None = None


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    enabled: bool
    added_by: str
    added_at: int
    updated_at: int


def validate_spec(spec: PackageSpec, field_prefix: str = "") -> PackageSpec:
    name = normalize_name(spec.name, f"{field_prefix}name")
    version = exact_version(spec.version, f"{field_prefix}version ({name})")
    return PackageSpec(name, version, spec.enabled)


def _to_package(row: AllowlistPackage) -> Package:
    return Package(row.name, row.version, row.enabled, row.added_by, row.added_at, row.updated_at)


def list_packages() -> list[Package]:
    return [_to_package(r) for r in AllowlistPackage.select().order_by(AllowlistPackage.name)]


def enabled_requirements() -> list[tuple[str, str]]:
    query = AllowlistPackage.select().where(AllowlistPackage.enabled == True)  # noqa: E712
    return [(r.name, r.version) for r in query.order_by(AllowlistPackage.name)]


def add_package(spec: PackageSpec, actor: str) -> Package:
    """Upsert: an existing name only changes version (and enabled when given) and updated time."""
    spec = validate_spec(spec)
    with database_proxy.atomic():
        row = AllowlistPackage.get_or_none(AllowlistPackage.name == spec.name)
        if row is None:
            row = AllowlistPackage.create(
                name=spec.name,
                version=spec.version,
                enabled=True if spec.enabled is None else spec.enabled,
                added_by=actor,
            )
        else:
            row.version = spec.version
            if spec.enabled is not None:
                row.enabled = spec.enabled
            row.updated_at = now()
            row.save()
    return _to_package(row)


def remove_package(raw_name: str) -> bool:
    name = normalize_name(raw_name)
    return bool(AllowlistPackage.delete().where(AllowlistPackage.name == name).execute())


def set_enabled(raw_name: str, enabled: bool) -> Package:
    name = normalize_name(raw_name)
    row = AllowlistPackage.get_or_none(AllowlistPackage.name == name)
    if row is None:
        raise NotFound(f"package {name!r} is not on the allowlist")
    row.enabled = enabled
    row.updated_at = now()
    row.save()
    return _to_package(row)


def set_packages(specs: Sequence[PackageSpec], actor: str) -> list[Package]:
    """Replace the whole allowlist in one transaction; validates everything before writing."""
    if len(specs) > MAX_ALLOWLIST:
        raise InvalidArgument("packages", f"at most {MAX_ALLOWLIST} packages, got {len(specs)}")
    valid = [validate_spec(s, f"packages[{i}].") for i, s in enumerate(specs)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(valid):
        if spec.name in seen:
            raise InvalidArgument(
                f"packages[{i}].name",
                f"{spec.name!r} is listed twice (also packages[{seen[spec.name]}])",
            )
        seen[spec.name] = i
    with database_proxy.atomic():
        old = {r.name: r for r in AllowlistPackage.select()}
        AllowlistPackage.delete().execute()
        stamp = now()
        for spec in valid:
            prev = old.get(spec.name)
            AllowlistPackage.create(
                name=spec.name,
                version=spec.version,
                enabled=True if spec.enabled is None else spec.enabled,
                added_by=prev.added_by if prev else actor,
                added_at=prev.added_at if prev else stamp,
                updated_at=stamp,
            )
    return list_packages()
