"""PackageAdmin's audit, export and blob methods: thin translation, mixed into AdminService.

Domain errors propagate to the auth interceptor, which maps them to status codes. GetBlob is
the admin's DownloadBlob (same chunks, same resumable offset), so `spk-core admin tree` can
build a release's tree on a machine that is not a satellite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from core.api.auth import current_identity
from core.install.audit import Auditor
from core.install.exports import FILENAMES, FORMATS, render
from core.state import releases, settings
from core.state.audits import Advisory, AuditIgnore, AuditPolicy, ReleaseAudit
from core.state.db import Database
from core.state.keys import SecretBox
from core.state.lockfiles import get_manifest
from core.state.origins import load_origins
from core.storage.blobstore import BlobStore
from shared.errors import InvalidArgument, NotFound
from shared.names import check_lockfile_hash, check_sha256
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb

CHUNK_SIZE = 256 * 1024  # as DownloadBlob (core/api/distribution_service.py explains the size)
MAX_HISTORY = 100


@dataclass(frozen=True)
class ReleaseTools:
    """What the audit, export and blob RPCs act on (assembled by the server)."""

    db: Database
    box: SecretBox
    auditor: Auditor
    store: BlobStore


def _advisory_pb(a: Advisory) -> pb.Advisory:
    return pb.Advisory(
        id=a.id,
        aliases=list(a.aliases),
        summary=a.summary,
        package=a.package,
        version=a.version,
        fixed_in=list(a.fixed_in),
        severity=a.severity,
        severity_source=a.severity_source,
        environments=list(a.environments),
        link=a.link,
        ignored=bool(a.ignored_reason),
        ignore_reason=a.ignored_reason,
    )


def audit_pb(audit: ReleaseAudit) -> pb.ReleaseAudit:
    r = audit.result
    return pb.ReleaseAudit(
        id=audit.id,
        release_sequence=audit.sequence,
        status=r.status,
        reason=r.reason,
        source=r.source,
        checked_at_unix=r.checked_at,
        trigger=audit.trigger,
        packages_checked=r.packages_checked,
        advisories=[_advisory_pb(a) for a in r.advisories],
        counts=[pb.SeverityCount(severity=s, count=n) for s, n in r.counts().items()],
        new_advisories=list(audit.new_ids),
        warnings=list(r.warnings),
    )


def _policy_pb(p: AuditPolicy, interval: int, next_run: float | None) -> pb.AuditPolicy:
    return pb.AuditPolicy(
        source=p.source,
        url=p.url,
        block_severity=p.block_severity,
        unknown_as=p.unknown_as,
        ignores=[
            pb.AuditIgnore(
                advisory_id=i.advisory_id,
                reason=i.reason,
                added_by=i.added_by,
                added_at_unix=i.added_at,
            )
            for i in p.ignores
        ],
        timeout_seconds=p.timeout_seconds,
        interval_seconds=max(interval, 0),
        next_run_unix=int(next_run or 0),
    )


@dataclass(frozen=True)
class _ExportInputs:
    manifest_hash: str
    environment: str
    sequence: int


def _export_inputs(lockfile_hash: str, environment: str) -> _ExportInputs:
    """(DB thread) Which manifest an export names: by hash, or the desired one of an environment."""
    if lockfile_hash:
        sequence = releases.release_for_hash(lockfile_hash)
        names = [n for n, h in releases.get_release(sequence).manifests if h == lockfile_hash]
        own = names[0] if names else ""
        if environment and environment != own:
            raise InvalidArgument(
                "environment",
                f"lockfile {lockfile_hash} was resolved for {own!r}, not {environment!r}",
            )
        return _ExportInputs(lockfile_hash, own, sequence)
    release = releases.desired_release()
    if release is None:
        raise NotFound("nothing has been installed yet; run InstallNow")
    name = environment or release.manifests[0][0]
    wanted = release.hash_for(name)
    if not wanted:
        known = ", ".join(n for n, _ in release.manifests)
        raise NotFound(f"the desired release has no environment {name!r}; it has {known}")
    return _ExportInputs(wanted, name, release.sequence)


def _render_export(box: SecretBox, request: pb.GetReleaseExportRequest) -> pb.ReleaseExport:
    fmt = request.format.strip().lower() or "pylock"
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"{request.format!r}: use pylock or requirements")
    wanted = check_lockfile_hash(request.lockfile_hash) if request.lockfile_hash else ""
    inputs = _export_inputs(wanted, request.environment)
    manifest = get_manifest(inputs.manifest_hash)
    content = render(
        fmt,
        manifest,
        load_origins(inputs.manifest_hash),
        inputs.environment,
        inputs.sequence,
        settings.load_registry(box).settings.index_url,
    )
    return pb.ReleaseExport(
        lockfile_hash=inputs.manifest_hash,
        environment=inputs.environment,
        release_sequence=inputs.sequence,
        format=fmt,
        filename=FILENAMES[fmt],
        content=content,
    )


def _merge_ignores(
    old: tuple[AuditIgnore, ...], wanted: list[pb.AuditIgnore], actor: str
) -> tuple[AuditIgnore, ...]:
    """The requested list; an entry that did not change keeps who added it and when."""
    kept = {i.advisory_id.upper(): i for i in old}
    merged = []
    for w in wanted:
        before = kept.get(w.advisory_id.strip().upper())
        if before is not None and before.reason == w.reason.strip():
            merged.append(before)
        else:
            merged.append(AuditIgnore(w.advisory_id, w.reason, added_by=actor))
    return tuple(merged)


class ReleaseToolsMixin:
    _tools: ReleaseTools

    async def AuditRelease(
        self, request: pb.AuditReleaseRequest, context: object
    ) -> pb.ReleaseAudit:
        auditor = self._tools.auditor
        wanted = check_lockfile_hash(request.lockfile_hash) if request.lockfile_hash else ""
        sequence = await auditor.resolve_sequence(request.release_sequence, wanted)
        return audit_pb(await auditor.audit_release(sequence, "on-demand"))

    async def GetAudit(self, request: pb.GetAuditRequest, context: object) -> pb.GetAuditResponse:
        auditor = self._tools.auditor
        wanted = check_lockfile_hash(request.lockfile_hash) if request.lockfile_hash else ""
        sequence = await auditor.resolve_sequence(request.release_sequence, wanted)
        found = await auditor.history(sequence, 1 + min(request.history, MAX_HISTORY))
        if not found:
            return pb.GetAuditResponse()
        return pb.GetAuditResponse(
            latest=audit_pb(found[0]), history=[audit_pb(a) for a in found[1:]]
        )

    async def GetAuditPolicy(
        self, request: pb.GetAuditPolicyRequest, context: object
    ) -> pb.AuditPolicy:
        auditor = self._tools.auditor
        policy = await auditor.policy()
        return _policy_pb(policy, auditor.interval_seconds, await auditor.next_run_for_desired())

    async def SetAuditPolicy(
        self, request: pb.SetAuditPolicyRequest, context: object
    ) -> pb.AuditPolicy:
        auditor = self._tools.auditor
        if request.ignores and not request.replace_ignores:
            raise InvalidArgument("replace_ignores", "must be true when ignores are given")
        old = await auditor.policy()
        new = replace(
            old,
            source=request.source if request.HasField("source") else old.source,
            url=request.url if request.HasField("url") else old.url,
            block_severity=request.block_severity
            if request.HasField("block_severity")
            else old.block_severity,
            unknown_as=request.unknown_as if request.HasField("unknown_as") else old.unknown_as,
            timeout_seconds=request.timeout_seconds
            if request.HasField("timeout_seconds")
            else old.timeout_seconds,
            ignores=_merge_ignores(old.ignores, list(request.ignores), current_identity().name)
            if request.replace_ignores
            else old.ignores,
        )
        saved = await auditor.set_policy(new)
        return _policy_pb(saved, auditor.interval_seconds, await auditor.next_run_for_desired())

    async def GetReleaseExport(
        self, request: pb.GetReleaseExportRequest, context: object
    ) -> pb.ReleaseExport:
        return await self._tools.db.run(_render_export, self._tools.box, request)

    async def GetBlob(
        self, request: pb.GetBlobRequest, context: object
    ) -> AsyncIterator[pb.AdminBlobChunk]:
        store = self._tools.store
        sha = check_sha256(request.sha256)
        total = await asyncio.to_thread(store.size, sha)
        if total is None:
            raise NotFound(f"no blob {sha} in the store")
        offset = request.offset
        if offset > total:
            raise InvalidArgument("offset", f"must be <= the blob size {total}")
        if offset == total:
            return
        reader = await asyncio.to_thread(store.open_read, sha, offset)
        try:
            while offset < total:
                data = await asyncio.to_thread(reader.read, CHUNK_SIZE)
                if not data:
                    break
                yield pb.AdminBlobChunk(data=data, offset=offset, total_size=total)
                offset += len(data)
        finally:
            reader.close()
