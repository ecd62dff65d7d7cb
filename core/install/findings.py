"""From findings to advisories, and what they mean: aliases merged, new or worse, what blocks.

Pure: the auditor (core/install/audit.py) feeds it what sources answered and the history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from core.install.advisories import Finding, Query
from core.state.audits import RANKED, Advisory, AuditPolicy, AuditResult, ReleaseAudit

_ID_ORDER = ("PYSEC-", "GHSA-")  # the id shown first; CVE ids rank last, as aliases


def _id_rank(advisory_id: str) -> tuple[int, str]:
    upper = advisory_id.upper()
    for rank, prefix in enumerate(_ID_ORDER):
        if upper.startswith(prefix):
            return rank, upper
    return (len(_ID_ORDER) + 1 if upper.startswith("CVE-") else len(_ID_ORDER)), upper


def _severity_rank(severity: str) -> int:
    return RANKED.index(severity) if severity in RANKED else -1


def merge_findings(
    findings: Sequence[Finding], environments: Mapping[Query, tuple[str, ...]], policy: AuditPolicy
) -> tuple[Advisory, ...]:
    """One advisory per vulnerability and package version: records sharing an id or an alias
    are one (PYSEC-x aliasing GHSA-y aliasing CVE-z), their facts unioned."""
    groups: list[list[Finding]] = []
    for finding in findings:
        ids = {i.upper() for i in (finding.id, *finding.aliases)}
        matched = [
            g
            for g in groups
            if g[0].package == finding.package
            and g[0].version == finding.version
            and ids & {i.upper() for f in g for i in (f.id, *f.aliases)}
        ]
        merged = [finding, *(f for g in matched for f in g)]
        groups = [g for g in groups if not any(g is m for m in matched)] + [merged]
    advisories = [_merge(g, environments, policy) for g in groups]
    return tuple(
        sorted(advisories, key=lambda a: (-_severity_rank(a.severity), a.package, _id_rank(a.id)))
    )


def _merge(
    group: list[Finding], environments: Mapping[Query, tuple[str, ...]], policy: AuditPolicy
) -> Advisory:
    ids = sorted({i for f in group for i in (f.id, *f.aliases)}, key=_id_rank)
    unique = list(dict.fromkeys(i.upper() for i in ids))
    ids = [next(i for i in ids if i.upper() == u) for u in unique]
    worst = max(group, key=lambda f: _severity_rank(f.severity))
    first = group[0]

    def by_id(f: Finding) -> tuple[int, str]:
        return _id_rank(f.id)

    fixed = sorted({v for f in group for v in f.fixed_in})
    advisory = Advisory(
        id=ids[0],
        aliases=tuple(ids[1:]),
        summary=next((f.summary for f in sorted(group, key=by_id) if f.summary), ""),
        package=first.package,
        version=first.version,
        fixed_in=tuple(fixed),
        severity=worst.severity,
        severity_source=worst.severity_source,
        environments=environments.get(Query(first.package, first.version), ()),
        link=next((f.link for f in group if f.link), ""),
    )
    ignore = policy.ignored(advisory.ids)
    return replace(advisory, ignored_reason=ignore.reason) if ignore is not None else advisory


def new_or_worse(result: AuditResult, previous: ReleaseAudit | None) -> list[Advisory]:
    """Advisories of `result` that the previous complete audit did not have, or had milder."""
    before = previous.result.advisories if previous is not None else ()
    changed: list[Advisory] = []
    for advisory in result.advisories:
        if advisory.ignored_reason:
            continue
        ids = {i.upper() for i in advisory.ids}
        known = [
            b for b in before if b.package == advisory.package and ids & {i.upper() for i in b.ids}
        ]
        if not known or _severity_rank(advisory.severity) > max(
            _severity_rank(b.severity) for b in known
        ):
            changed.append(advisory)
    return changed


def blocking(result: AuditResult, policy: AuditPolicy) -> list[Advisory]:
    return [a for a in result.advisories if policy.blocks(a)] if result.status == "ok" else []


def block_message(blocked: Sequence[Advisory], policy: AuditPolicy) -> str:
    listed = "; ".join(
        f"{a.package} {a.version}: {a.id}"
        + (f" ({', '.join(a.aliases)})" if a.aliases else "")
        + f" {a.severity}"
        + (f", fixed in {', '.join(a.fixed_in)}" if a.fixed_in else "")
        for a in blocked
    )
    return (
        f"the audit policy blocks this release: {len(blocked)} advisor"
        f"{'y' if len(blocked) == 1 else 'ies'} at or above {policy.block_severity}"
        f" (unknown severity counts as {policy.unknown_as}): {listed}. The previous release"
        " stays; pin fixed versions, or accept an advisory with a reason (SetAuditPolicy"
        " ignores, `spk-core admin audit-policy ignore ID --reason ...`)"
    )
