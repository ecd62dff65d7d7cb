"""Vulnerability audits of releases: after every publish, on a schedule, on demand, and as a gate.

    Auditor.check_before_publish   the blocking policy, before a release is published: refuses
                                   it naming the packages and advisory ids (the installer then
                                   keeps the previous release); only runs when a policy blocks
    Auditor.after_publish          records the gate's result, or audits in the background:
                                   `ready` never waits for an advisory source
    Auditor.audit_release          on demand (AuditRelease) and from the schedule
    Auditor.run_schedule           every `interval` since the desired release's last audit

Every audit is bounded by the policy's timeout; a source that is down, slow or broken gives an
audit of status `unknown` with the reason, never an error and never a blocked install. An
advisory that is new, or worse, than at the last complete audit is logged once and counted in
the auditor's FindingsCounter (the hook for metrics: `subscribe(callback)`); each CoreServer
passes its own, so cores sharing a process do not count each other's. AUDIT_FINDINGS is the
default for an Auditor built without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from core.install.advisories import (
    AdvisorySource,
    JsonApiSource,
    Query,
    SourceAnswer,
    SourceBroken,
)
from core.install.findings import block_message, blocking, merge_findings, new_or_worse
from core.install.osv import OsvSource
from core.state import audits, releases, settings
from core.state.audits import AuditPolicy, AuditResult, ReleaseAudit
from core.state.db import Database
from core.state.index_config import RegistrySettings
from core.state.keys import SecretBox
from core.state.lockfiles import get_manifest
from shared.errors import FailedPrecondition, NotFound
from shared.manifest import Manifest

log = logging.getLogger(__name__)
DAY_SECONDS = 24 * 3600
MAX_NAP_SECONDS = 300.0
RETRY_SECONDS = 600.0


class FindingsCounter:
    """Advisories new or worse than at the previous audit, by severity.

    The hook for metrics: `subscribe(fn)` is called as fn(severity, count) for every addition
    (a prometheus Counter's `labels(severity).inc` fits); `totals` keeps what was counted.
    """

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self._listeners: list[Callable[[str, int], None]] = []

    def subscribe(self, listener: Callable[[str, int], None]) -> None:
        self._listeners.append(listener)

    def add(self, severity: str, count: int = 1) -> None:
        self.totals[severity] += count
        for listener in self._listeners:
            try:
                listener(severity, count)
            except Exception:  # a broken metrics hook must not break an audit
                log.exception("audit findings listener failed")


AUDIT_FINDINGS = FindingsCounter()


# --------------------------------------------------------------------------- pure parts


def json_api_base(index_url: str) -> str | None:
    """The JSON API next to a simple index: https://pypi.org/simple -> https://pypi.org/pypi."""
    parts = urlsplit(index_url)
    path = parts.path.rstrip("/")
    if not path.endswith("/simple"):
        return None
    return urlunsplit((parts.scheme, parts.netloc, path[: -len("simple")] + "pypi", "", ""))


def build_source(policy: AuditPolicy, registry: RegistrySettings) -> AdvisorySource | str:
    """The configured source, or why there is none (the audit is then `unknown`)."""
    timeout = float(min(policy.timeout_seconds, registry.timeout_seconds))
    if policy.source == "off":
        return "auditing is off (SetAuditPolicy source=off)"
    if policy.source == "osv":
        return OsvSource(policy.url, registry, timeout)
    base = policy.url or json_api_base(registry.index_url)
    if base is None:
        return (
            f"no JSON API can be derived from the index {registry.index_url} (it does not end"
            " in /simple); set the audit source's url, or use an osv source"
        )
    return JsonApiSource(base, registry, timeout)


async def audit_manifests(
    manifests: Sequence[tuple[str, Manifest]],
    policy: AuditPolicy,
    registry: RegistrySettings,
    clock: Callable[[], float] = time.time,
) -> AuditResult:
    """Audit every (name, version) of the given environments' manifests; never raises for the
    source's sake: a source that breaks or is too slow gives status `unknown` and the reason."""
    environments: dict[Query, tuple[str, ...]] = {}
    for env, manifest in manifests:
        for entry in manifest.entries:
            q = Query(entry.name, entry.version)
            environments[q] = (*environments.get(q, ()), env)
    queries = sorted(environments, key=lambda q: (q.name, q.version))
    source = build_source(policy, registry)
    if isinstance(source, str):
        return AuditResult("unknown", source, policy.source, int(clock()), 0)
    answer = SourceAnswer()
    failure = ""
    try:
        async with asyncio.timeout(policy.timeout_seconds):
            await source.query(queries, answer)
    except TimeoutError:
        failure = (
            f"{source.description} did not finish within {policy.timeout_seconds} s"
            f" ({len(answer.checked)} of {len(queries)} packages answered)"
        )
    except SourceBroken as exc:
        failure = exc.message
    except Exception as exc:
        log.exception("audit against %s failed unexpectedly", source.description)
        failure = f"internal error reading {source.description}: {type(exc).__name__}"
    if registry.token:
        failure = failure.replace(registry.token, "***")
    return AuditResult(
        status="unknown" if failure else "ok",
        reason=failure,
        source=source.description,
        checked_at=int(clock()),
        packages_checked=len(answer.checked),
        advisories=merge_findings(answer.findings, environments, policy),
        warnings=tuple(sorted(set(answer.warnings))),
    )


# --------------------------------------------------------------------------- the service


class Auditor:
    """Audits releases and keeps their history; one audit at a time per core instance."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        interval_seconds: int = DAY_SECONDS,
        findings: FindingsCounter = AUDIT_FINDINGS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._box = box
        self.interval_seconds = interval_seconds
        self._findings = findings
        self._clock = clock
        self._one_at_a_time = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._schedule_started: float | None = None

    async def policy(self) -> AuditPolicy:
        return await self._db.run(audits.load_policy)

    async def set_policy(self, policy: AuditPolicy) -> AuditPolicy:
        return await self._db.run(audits.save_policy, policy)

    async def enforcing(self) -> bool:
        """Whether publishing waits for an audit (a blocking policy with a source)."""
        policy = await self.policy()
        return bool(policy.block_severity) and policy.source != "off"

    async def _audit(self, manifests: Sequence[tuple[str, Manifest]]) -> AuditResult:
        policy = await self.policy()
        registry = (await self._db.run(settings.load_registry, self._box)).settings
        return await audit_manifests(manifests, policy, registry, self._clock)

    async def check_before_publish(
        self, manifests: Mapping[str, Manifest], order: Sequence[str]
    ) -> AuditResult:
        """Audit what an install is about to publish; FailedPrecondition when policy blocks it."""
        result = await self._audit([(name, manifests[name]) for name in order])
        policy = await self.policy()
        if result.status != "ok":
            log.warning("audit before publish is unknown, publishing anyway: %s", result.reason)
        elif blocked := blocking(result, policy):
            raise FailedPrecondition(block_message(blocked, policy))
        return result

    def after_publish(self, sequence: int, checked: AuditResult | None) -> None:
        """Record the gate's result for the new release, or audit it in the background."""

        async def run() -> None:
            try:
                if checked is not None:
                    async with self._one_at_a_time:
                        await self._record(sequence, "publish", checked)
                else:
                    await self.audit_release(sequence, "publish")
            except Exception:
                log.exception("audit of release %d after publish failed", sequence)

        task = asyncio.create_task(run(), name=f"audit-release-{sequence}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def resolve_sequence(self, sequence: int = 0, lockfile_hash: str = "") -> int:
        """A release by sequence, by the hash of any of its manifests, or the desired one."""
        if lockfile_hash:
            return await self._db.run(releases.release_for_hash, lockfile_hash)
        if sequence:
            await self._db.run(releases.get_release, sequence)
            return sequence
        desired = await self._db.run(releases.desired_sequence)
        if not desired:
            raise NotFound("nothing has been published yet; run InstallNow first")
        return desired

    async def audit_release(self, sequence: int, trigger: str) -> ReleaseAudit:
        release = await self._db.run(releases.get_release, sequence)
        manifests = [(name, await self._db.run(get_manifest, h)) for name, h in release.manifests]
        async with self._one_at_a_time:
            result = await self._audit(manifests)
            return await self._record(sequence, trigger, result)

    async def _record(self, sequence: int, trigger: str, result: AuditResult) -> ReleaseAudit:
        previous = await self._db.run(audits.last_complete_audit)
        changed = new_or_worse(result, previous) if result.status == "ok" else []
        recorded = await self._db.run(
            audits.record_audit, sequence, trigger, result, tuple(a.id for a in changed)
        )
        for a in changed:
            log.warning(
                "audit: release %d ships %s %s with %s advisory %s%s: %s (fixed in %s)",
                sequence,
                a.package,
                a.version,
                a.severity,
                a.id,
                f" ({', '.join(a.aliases)})" if a.aliases else "",
                a.summary or "no summary",
                ", ".join(a.fixed_in) or "no release yet",
            )
            self._findings.add(a.severity)
        found = ", ".join(f"{n} {s}" for s, n in result.counts().items() if n) or "none"
        log.info(
            "audit of release %d (%s) via %s: %s; advisories: %s%s",
            sequence,
            trigger,
            result.source,
            result.status,
            found,
            f"; {result.reason}" if result.reason else "",
        )
        return recorded

    async def history(self, sequence: int, limit: int) -> list[ReleaseAudit]:
        return await self._db.run(audits.audit_history, sequence, limit)

    def next_run_at(self, last_checked: int | None) -> float | None:
        if self.interval_seconds <= 0 or self._schedule_started is None:
            return None
        return (last_checked or self._schedule_started) + self.interval_seconds

    async def next_run_for_desired(self) -> float | None:
        desired = await self._db.run(releases.desired_sequence)
        if not desired:
            return None
        return self.next_run_at(await self._db.run(audits.last_checked_at, desired))

    async def run_schedule(self) -> None:
        """Forever: audit the desired release when `interval` has passed since its last audit
        (any instance's, as recorded in the shared history). Returns at once when 0 (off)."""
        if self.interval_seconds <= 0:
            return
        self._schedule_started = self._clock()
        while True:
            try:
                due = await self.next_run_for_desired()
                if due is None or due > self._clock():
                    # Nothing published yet: look again after one interval (or a nap).
                    wait = self.interval_seconds if due is None else due - self._clock()
                    await asyncio.sleep(min(max(wait, 1.0), MAX_NAP_SECONDS))
                    continue
                await self.audit_release(await self._db.run(releases.desired_sequence), "schedule")
            except Exception:
                log.exception("scheduled audit failed; retrying later")
                await asyncio.sleep(min(RETRY_SECONDS, self.interval_seconds))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
