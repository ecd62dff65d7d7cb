"""Vulnerability audits: the policy, the result model and the audit history (sync, DB thread).

    AuditPolicy      where advisories come from, what blocks a publish, what is ignored and why
    Advisory         one vulnerability of one package version, aliases merged
    AuditResult      what one audit found: status ok | unknown (+ reason), advisories, counts
    ReleaseAudit     an AuditResult recorded for a release, with what was new since the last

Severity is one of SEVERITIES, lowest first. A source that gives none (PyPI's JSON API never
does) yields `unknown`; for the blocking policy an unknown severity counts as
`AuditPolicy.unknown_as` (default critical: it blocks at any threshold, since nothing says it
is less). An audit whose source was unreachable or broken is `unknown` and never blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlsplit

from core.state.db import AuditRow, Setting, now, upsert
from core.state.index_config import is_loopback_host
from core.state.settings import validate_index_url
from shared.errors import InvalidArgument

POLICY_KEY = "audit_policy"
SEVERITIES = ("unknown", "low", "medium", "high", "critical")  # display: unknown first
RANKED = ("low", "medium", "high", "critical")  # what a threshold compares
SOURCES = ("json", "osv", "off")
MAX_IGNORES = 500
MAX_TIMEOUT = 300


@dataclass(frozen=True)
class AuditIgnore:
    """An advisory the admin accepted: matched by its id or any alias; the reason is required."""

    advisory_id: str
    reason: str
    added_by: str = ""
    added_at: int = 0


@dataclass(frozen=True)
class AuditPolicy:
    source: str = "json"  # json: the index's JSON API; osv: an OSV-compatible URL; off
    url: str = ""  # json: the API base ("" = derived from the index URL); osv: required
    block_severity: str = ""  # "" = report only; else publishing at or above it is refused
    unknown_as: str = "critical"  # how policy ranks an advisory without a severity
    ignores: tuple[AuditIgnore, ...] = ()
    timeout_seconds: int = 30  # the whole audit, every request included

    def ignored(self, ids: tuple[str, ...]) -> AuditIgnore | None:
        wanted = {i.upper() for i in ids}
        return next((i for i in self.ignores if i.advisory_id.upper() in wanted), None)

    def rank(self, severity: str) -> int:
        effective = self.unknown_as if severity == "unknown" else severity
        return RANKED.index(effective) if effective in RANKED else len(RANKED)

    def blocks(self, advisory: Advisory) -> bool:
        if not self.block_severity or advisory.ignored_reason:
            return False
        return self.rank(advisory.severity) >= RANKED.index(self.block_severity)


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str
    package: str  # PEP 503 name
    version: str
    fixed_in: tuple[str, ...]
    severity: str  # one of SEVERITIES
    severity_source: str = ""  # as the source said it: "CVSS:3.1/AV:N/..." or "MODERATE"
    environments: tuple[str, ...] = ()  # the release's environments that ship this version
    link: str = ""
    ignored_reason: str = ""  # non-empty: on the policy's ignore list, not counted

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


@dataclass(frozen=True)
class AuditResult:
    status: str  # ok | unknown
    reason: str  # why unknown
    source: str  # "json https://pypi.org/pypi", "osv https://api.osv.dev", "off"
    checked_at: int
    packages_checked: int
    advisories: tuple[Advisory, ...] = ()
    warnings: tuple[str, ...] = ()  # records skipped as malformed, packages the source lacks

    def counts(self) -> dict[str, int]:
        """Advisories by severity, ignored ones left out; every severity present."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for a in self.advisories:
            if not a.ignored_reason:
                counts[a.severity] += 1
        return counts


@dataclass(frozen=True)
class ReleaseAudit:
    id: int
    sequence: int
    trigger: str  # publish | schedule | on-demand
    result: AuditResult
    new_ids: tuple[str, ...] = field(default=())  # new or worse than at the previous audit


# --------------------------------------------------------------------------- policy


def _check_severity(value: str, field_name: str, allow_empty: bool) -> str:
    text = value.strip().lower()
    if text in ("", "none", "off") and allow_empty:
        return ""
    if text not in RANKED:
        allowed = ", ".join(RANKED) + (" or none (report only)" if allow_empty else "")
        raise InvalidArgument(field_name, f"{value!r} is not a severity; use {allowed}")
    return text


def check_source_url(url: str, field_name: str) -> str:
    text = validate_index_url(url, field_name).rstrip("/")
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise InvalidArgument(field_name, "must not carry a query or fragment")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        raise InvalidArgument(
            field_name,
            f"plain http is only allowed for localhost (loopback), not {parts.hostname}; use https",
        )
    return text


def validate_policy(policy: AuditPolicy) -> AuditPolicy:
    """The policy as stored: normalised, or InvalidArgument naming the field and the rule."""
    source = policy.source.strip().lower()
    if source not in SOURCES:
        raise InvalidArgument("audit.source", f"{policy.source!r}: use json, osv or off")
    url = check_source_url(policy.url, "audit.url") if policy.url.strip() else ""
    if source == "osv" and not url:
        raise InvalidArgument("audit.url", "is required for source osv (e.g. https://api.osv.dev)")
    if not 1 <= policy.timeout_seconds <= MAX_TIMEOUT:
        raise InvalidArgument("audit.timeout_seconds", f"must be between 1 and {MAX_TIMEOUT}")
    if len(policy.ignores) > MAX_IGNORES:
        raise InvalidArgument("audit.ignores", f"at most {MAX_IGNORES} entries")
    ignores: dict[str, AuditIgnore] = {}
    for i, ignore in enumerate(policy.ignores):
        where = f"audit.ignores[{i}]"
        advisory = ignore.advisory_id.strip()
        if not advisory or len(advisory) > 128 or any(c.isspace() for c in advisory):
            raise InvalidArgument(f"{where}.advisory_id", "must be one advisory id or alias")
        if not ignore.reason.strip():
            raise InvalidArgument(f"{where}.reason", "is required: say why it is accepted")
        reason = ignore.reason.strip()
        ignores[advisory.upper()] = replace(ignore, advisory_id=advisory, reason=reason)
    return AuditPolicy(
        source=source,
        url=url,
        block_severity=_check_severity(policy.block_severity, "audit.block_severity", True),
        unknown_as=_check_severity(policy.unknown_as, "audit.unknown_as", False),
        ignores=tuple(ignores.values()),
        timeout_seconds=policy.timeout_seconds,
    )


def load_policy() -> AuditPolicy:
    row = Setting.get_or_none(Setting.key == POLICY_KEY)
    if row is None:
        return AuditPolicy()
    raw = json.loads(row.value)
    raw["ignores"] = tuple(AuditIgnore(**i) for i in raw.get("ignores", []))
    return AuditPolicy(**raw)


def save_policy(policy: AuditPolicy) -> AuditPolicy:
    clean = validate_policy(policy)
    stamped = tuple(i if i.added_at else replace(i, added_at=now()) for i in clean.ignores)
    clean = replace(clean, ignores=stamped)
    upsert(Setting, key=POLICY_KEY, value=json.dumps(asdict(clean)))
    return clean


# --------------------------------------------------------------------------- history


def _advisory_from(raw: dict[str, object]) -> Advisory:
    data = dict(raw)
    for key in ("aliases", "fixed_in", "environments"):
        data[key] = tuple(data.get(key, ()))  # type: ignore[arg-type]
    return Advisory(**data)  # type: ignore[arg-type]


def _audit_from(row: AuditRow) -> ReleaseAudit:
    raw = json.loads(row.result_json)
    result = AuditResult(
        status=row.status,
        reason=raw.get("reason", ""),
        source=row.source,
        checked_at=int(row.checked_at),
        packages_checked=int(raw.get("packages_checked", 0)),
        advisories=tuple(_advisory_from(a) for a in raw.get("advisories", [])),
        warnings=tuple(raw.get("warnings", [])),
    )
    return ReleaseAudit(
        int(row.id), int(row.sequence), row.trigger, result, tuple(raw.get("new_ids", []))
    )


def record_audit(
    sequence: int, trigger: str, result: AuditResult, new_ids: tuple[str, ...]
) -> ReleaseAudit:
    doc = {
        "reason": result.reason,
        "packages_checked": result.packages_checked,
        "advisories": [asdict(a) for a in result.advisories],
        "warnings": list(result.warnings),
        "new_ids": list(new_ids),
    }
    row = AuditRow.create(
        sequence=sequence,
        checked_at=result.checked_at,
        trigger=trigger,
        source=result.source[:512],
        status=result.status,
        result_json=json.dumps(doc, sort_keys=True),
    )
    return _audit_from(row)


def audit_history(sequence: int, limit: int) -> list[ReleaseAudit]:
    """The audits of one release, newest first."""
    rows = (
        AuditRow.select()
        .where(AuditRow.sequence == sequence)
        .order_by(AuditRow.checked_at.desc(), AuditRow.id.desc())
        .limit(limit)
    )
    return [_audit_from(r) for r in rows]


def last_complete_audit() -> ReleaseAudit | None:
    """The newest audit of any release whose source answered: what `new or worse` compares to."""
    row = (
        AuditRow.select()
        .where(AuditRow.status == "ok")
        .order_by(AuditRow.checked_at.desc(), AuditRow.id.desc())
        .first()
    )
    return _audit_from(row) if row is not None else None


def last_checked_at(sequence: int) -> int | None:
    row = (
        AuditRow.select(AuditRow.checked_at)
        .where(AuditRow.sequence == sequence)
        .order_by(AuditRow.checked_at.desc())
        .first()
    )
    return int(row.checked_at) if row is not None else None
