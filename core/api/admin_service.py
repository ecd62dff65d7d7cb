"""PackageAdmin servicer: thin translation between protobuf and the core's modules.

Storage and blob GC methods live in core/api/storage_service.py, audits, exports and GetBlob in
core/api/release_tools.py, target environments in core/api/environment_service.py (mixed in).
Methods defined nowhere answer UNIMPLEMENTED (the generated base class does that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from core.api.auth import current_identity
from core.api.environment_service import EnvironmentAdminMixin
from core.api.release_tools import ReleaseTools, ReleaseToolsMixin
from core.api.storage_service import StorageAdminMixin, StorageOps
from core.fanout.desired import load_desired
from core.fanout.hub import Hub
from core.fanout.stream_leases import StreamLeases
from core.install.index_search import IndexCatalog
from core.install.install_state import EnvProgress
from core.install.installer import Installer, InstallState
from core.state import allowlist, environments, fleet, lockfiles, releases, settings
from core.state.db import Database
from core.state.keys import SecretBox
from shared.errors import InvalidArgument, NotFound
from shared.manifest import TargetEnvironment
from shared.names import check_lockfile_hash, normalize_name
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc, common_pb2
from shared.wire import (
    environment_from_pb,
    environment_to_pb,
    host_to_pb,
    manifest_to_pb,
)

_STATUS = {
    "idle": pb.INSTALL_STATUS_IDLE,
    "installing": pb.INSTALL_STATUS_INSTALLING,
    "ready": pb.INSTALL_STATUS_READY,
    "error": pb.INSTALL_STATUS_ERROR,
}


def _package_pb(p: allowlist.Package) -> pb.Package:
    return pb.Package(
        name=p.name,
        version=p.version,
        enabled=p.enabled,
        added_by=p.added_by,
        added_at_unix=p.added_at,
        updated_at_unix=p.updated_at,
    )


def _env_install_pb(e: EnvProgress) -> pb.EnvironmentInstall:
    return pb.EnvironmentInstall(
        name=e.name,
        status=e.status,
        lockfile_hash=e.lockfile_hash,
        wheels=e.wheels,
        total_bytes=e.total_bytes,
        error=e.error,
        warnings=e.warnings,
    )


def _install_pb(s: InstallState) -> pb.InstallState:
    return pb.InstallState(
        status=_STATUS.get(s.status, pb.INSTALL_STATUS_UNSPECIFIED),
        lockfile_hash=s.lockfile_hash,
        attempted_hash=s.attempted_hash,
        started_at_unix=s.started_at,
        finished_at_unix=s.finished_at,
        total_bytes=s.total_bytes,
        warnings=list(s.warnings),
        error=s.error,
        phase=s.phase,
        wheels_done=s.wheels_done,
        wheels_total=s.wheels_total,
        environments=[_env_install_pb(e) for e in s.environments],
        release_sequence=s.release_sequence,
    )


def _registry_pb(c: settings.RegistryConfig, default: TargetEnvironment) -> pb.RegistryConfig:
    return pb.RegistryConfig(
        index_url=c.settings.index_url,
        extra_index_urls=list(c.settings.extra_index_urls),
        username=c.settings.username,
        has_auth_token=bool(c.settings.token),
        wheels_only=True,
        target=environment_to_pb(default),
        timeout_seconds=c.settings.timeout_seconds,
    )


def _load_registry_view(box: SecretBox) -> tuple[settings.RegistryConfig, TargetEnvironment]:
    return settings.load_registry(box), environments.ensure_default()[0].target


def _update_registry_view(
    box: SecretBox, update: settings.RegistryUpdate
) -> tuple[settings.RegistryConfig, TargetEnvironment]:
    return settings.update_registry(box, update), environments.ensure_default()[0].target


def _release_rows() -> list[tuple[releases.ReleaseView, dict[str, tuple[int, int]]]]:
    sizes = {r.lockfile_hash: (r.entry_count, r.total_size) for r, _ in lockfiles.list_lockfiles()}
    return [(r, sizes) for r in releases.list_releases()]


def fleet_summary(satellites: list[pb.Satellite]) -> list[pb.FleetSummary]:
    """Counts per environment ("" for unserved hosts): converged, syncing, error, unserved."""
    by_env: dict[str, pb.FleetSummary] = {}
    for s in satellites:
        if s.revoked:
            continue
        row = by_env.setdefault(s.environment, pb.FleetSummary(environment=s.environment))
        if s.unserved:
            row.unserved += 1
        elif s.status == "ready" and s.current_hash == s.desired_hash:
            row.converged += 1
        elif s.status == "syncing":
            row.syncing += 1
        elif s.status == "error":
            row.error += 1
        else:
            row.other += 1
    return [by_env[k] for k in sorted(by_env)]


class AdminService(
    StorageAdminMixin,
    ReleaseToolsMixin,
    EnvironmentAdminMixin,
    admin_pb2_grpc.PackageAdminServicer,
):
    def __init__(
        self,
        db: Database,
        box: SecretBox,
        installer: Installer,
        hub: Hub,
        ops: StorageOps,
        tools: ReleaseTools,
        leases: StreamLeases | None = None,
    ) -> None:
        self._tools = tools  # audits, exports, blobs (core/api/release_tools.py)
        self._leases = leases or StreamLeases(db, hub, shared=False)  # who is connected
        self._db = db
        self._box = box
        self._installer = installer
        self._hub = hub
        self._catalog = IndexCatalog()
        self._ops = ops

    # ---- allowlist ----
    async def ListPackages(
        self, request: pb.ListPackagesRequest, context: object
    ) -> pb.ListPackagesResponse:
        rows = await self._db.run(allowlist.list_packages)
        return pb.ListPackagesResponse(packages=[_package_pb(p) for p in rows])

    async def AddPackage(self, request: pb.AddPackageRequest, context: object) -> pb.Package:
        spec = allowlist.PackageSpec(
            request.name, request.version, request.enabled if request.HasField("enabled") else None
        )
        actor = current_identity().name
        return _package_pb(await self._db.run(allowlist.add_package, spec, actor))

    async def RemovePackage(
        self, request: pb.RemovePackageRequest, context: object
    ) -> pb.RemovePackageResponse:
        return pb.RemovePackageResponse(
            removed=await self._db.run(allowlist.remove_package, request.name)
        )

    async def SetPackageEnabled(
        self, request: pb.SetPackageEnabledRequest, context: object
    ) -> pb.Package:
        return _package_pb(await self._db.run(allowlist.set_enabled, request.name, request.enabled))

    async def SetPackages(
        self, request: pb.SetPackagesRequest, context: object
    ) -> pb.ListPackagesResponse:
        specs = [
            allowlist.PackageSpec(p.name, p.version, p.enabled if p.HasField("enabled") else None)
            for p in request.packages
        ]
        rows = await self._db.run(allowlist.set_packages, specs, current_identity().name)
        return pb.ListPackagesResponse(packages=[_package_pb(p) for p in rows])

    # ---- registry ----
    async def GetRegistryConfig(
        self, request: pb.GetRegistryConfigRequest, context: object
    ) -> pb.RegistryConfig:
        return _registry_pb(*await self._db.run(_load_registry_view, self._box))

    async def SetRegistryConfig(
        self, request: pb.SetRegistryConfigRequest, context: object
    ) -> pb.RegistryConfig:
        target: TargetEnvironment | None = None
        clear_target = False
        if request.HasField("target"):
            if request.target.platform or request.target.abi:
                target = environment_from_pb(request.target)
            else:
                clear_target = True  # an empty target means: the core's own interpreter
        if request.extra_index_urls and not request.replace_extra_index_urls:
            raise InvalidArgument(
                "replace_extra_index_urls", "must be true when extra_index_urls are given"
            )
        update = settings.RegistryUpdate(
            index_url=request.index_url if request.HasField("index_url") else None,
            extra_index_urls=list(request.extra_index_urls)
            if request.replace_extra_index_urls
            else None,
            username=request.username if request.HasField("username") else None,
            token=request.auth_token if request.HasField("auth_token") else None,
            wheels_only=request.wheels_only if request.HasField("wheels_only") else None,
            target=target,
            clear_target=clear_target,
            timeout_seconds=request.timeout_seconds
            if request.HasField("timeout_seconds")
            else None,
        )
        return _registry_pb(*await self._db.run(_update_registry_view, self._box, update))

    async def SearchPackages(
        self, request: pb.SearchPackagesRequest, context: object
    ) -> pb.SearchPackagesResponse:
        config = await self._db.run(settings.load_registry, self._box)
        names = await self._catalog.search(request.query, config.settings, request.limit)
        return pb.SearchPackagesResponse(names=names)

    async def GetPackageVersions(
        self, request: pb.GetPackageVersionsRequest, context: object
    ) -> pb.GetPackageVersionsResponse:
        config = await self._db.run(settings.load_registry, self._box)
        versions = await self._catalog.versions(request.name, config.settings)
        return pb.GetPackageVersionsResponse(name=normalize_name(request.name), versions=versions)

    # ---- install ----
    async def InstallNow(self, request: pb.InstallNowRequest, context: object) -> pb.InstallState:
        return _install_pb(await self._installer.start())

    async def GetInstallState(
        self, request: pb.GetInstallStateRequest, context: object
    ) -> pb.InstallState:
        return _install_pb(await self._installer.state())

    async def WatchInstall(
        self, request: pb.WatchInstallRequest, context: object
    ) -> AsyncIterator[pb.InstallState]:
        async for state in self._installer.watch():
            yield _install_pb(state)

    async def GetManifest(
        self, request: pb.AdminGetManifestRequest, context: object
    ) -> common_pb2.Manifest:
        wanted = request.lockfile_hash
        if wanted:
            wanted = check_lockfile_hash(wanted)
        else:
            # The database, not this instance's hub: an install's `ready` commits with its
            # release, and the hub (here or on another instance behind the balancer) learns of
            # it a moment later, so a client that saw `ready` would be shown the old manifest.
            desired = await self._db.run(load_desired)
            if not desired.manifests:
                raise NotFound("nothing has been installed yet; run InstallNow")
            name = request.environment or desired.manifests[0][0]
            wanted = desired.hash_for(name)
            if not wanted:
                known = ", ".join(n for n, _, _ in desired.manifests)
                raise NotFound(f"the desired release has no environment {name!r}; it has {known}")
        return manifest_to_pb(await self._db.run(lockfiles.get_manifest, wanted))

    async def ListLockfiles(
        self, request: pb.ListLockfilesRequest, context: object
    ) -> pb.ListLockfilesResponse:
        rows = await self._db.run(lockfiles.list_lockfiles)
        current = (await self._db.run(load_desired)).hashes()  # as in GetManifest
        return pb.ListLockfilesResponse(
            lockfiles=[
                pb.LockfileSummary(
                    lockfile_hash=r.lockfile_hash,
                    sequence=r.sequence,
                    created_at_unix=r.created_at,
                    entry_count=r.entry_count,
                    total_size=r.total_size,
                    current=r.lockfile_hash in current,
                    environment=r.environment,
                )
                for r, _ in rows
            ]
        )

    async def ListReleases(
        self, request: pb.ListReleasesRequest, context: object
    ) -> pb.ListReleasesResponse:
        rows = await self._db.run(_release_rows)
        desired = self._hub.desired.sequence
        return pb.ListReleasesResponse(
            releases=[
                pb.Release(
                    sequence=r.sequence,
                    created_at_unix=r.created_at,
                    current=r.sequence == desired,
                    manifests=[
                        pb.ReleaseManifest(
                            environment=name,
                            lockfile_hash=h,
                            entry_count=sizes.get(h, (0, 0))[0],
                            total_size=sizes.get(h, (0, 0))[1],
                        )
                        for name, h in r.manifests
                    ],
                )
                for r, sizes in rows
            ]
        )

    async def Rollback(self, request: pb.RollbackRequest, context: object) -> pb.InstallState:
        release = await self._ops.rollback(request.lockfile_hash, sequence=request.release_sequence)
        # A rollback publishes a release too: audited like any (in the background, never gated).
        self._tools.auditor.after_publish(release.sequence, None)
        return _install_pb(await self._installer.state())

    # ---- limits ----
    async def GetSizeCap(self, request: pb.GetSizeCapRequest, context: object) -> pb.SizeCap:
        cap = await self._db.run(settings.load_size_cap)
        return pb.SizeCap(warn_bytes=cap.warn_bytes, block_bytes=cap.block_bytes)

    async def SetSizeCap(self, request: pb.SizeCap, context: object) -> pb.SizeCap:
        cap = settings.SizeCap(request.warn_bytes, request.block_bytes)
        cap = await self._db.run(settings.save_size_cap, cap)
        return pb.SizeCap(warn_bytes=cap.warn_bytes, block_bytes=cap.block_bytes)

    # ---- fleet ----
    async def ListSatellites(
        self, request: pb.ListSatellitesRequest, context: object
    ) -> pb.ListSatellitesResponse:
        rows = await self._db.run(fleet.list_all)
        satellites: list[pb.Satellite] = []
        for r in rows:
            host = fleet.host_of(r)
            offer = self._hub.offer_for(host)
            status = "unserved" if offer.unserved else r.status
            satellites.append(
                pb.Satellite(
                    name=r.name,
                    connected=self._leases.connected(r.name, r.stream_until),
                    last_seen_unix=r.last_seen,
                    desired_hash=offer.lockfile_hash,
                    current_hash=r.current_hash,
                    status=status,
                    error=offer.unserved or r.error,
                    last_pull_bytes=r.last_pull_bytes,
                    last_pull_blobs=r.last_pull_blobs,
                    last_duration_ms=r.last_duration_ms,
                    agent_version=r.agent_version,
                    python_version=r.python_version,
                    platform=r.platform,
                    revoked=r.revoked,
                    created_at_unix=r.created_at,
                    environment=offer.environment,
                    host=host_to_pb(host) if host is not None else None,
                    unserved=bool(offer.unserved),
                    last_wheel_bytes=r.last_wheel_bytes,
                    last_pull_patches=r.last_pull_patches,
                )
            )
        return pb.ListSatellitesResponse(satellites=satellites, summary=fleet_summary(satellites))

    async def CreateSatellite(
        self, request: pb.CreateSatelliteRequest, context: object
    ) -> pb.CreateSatelliteResponse:
        token = await self._db.run(fleet.create, request.name)
        return pb.CreateSatelliteResponse(name=request.name, token=token)

    async def RevokeSatellite(
        self, request: pb.RevokeSatelliteRequest, context: object
    ) -> pb.RevokeSatelliteResponse:
        await self._db.run(fleet.revoke, request.name)
        self._hub.close_key(request.name)
        return pb.RevokeSatelliteResponse()
