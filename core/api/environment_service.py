"""PackageAdmin's target environments: thin translation, mixed into AdminService.

The list shapes the next install only (core/state/environments.py); the hub is told at once, so
an unserved satellite learns that an environment for it exists and now needs an install.
"""

from __future__ import annotations

from core.fanout.desired import load_desired
from core.fanout.hub import Hub
from core.install.uv_resolver import resolution_target, uv_platform
from core.state import environments
from core.state.db import Database
from shared.environments import validate_environment
from shared.errors import InvalidArgument
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb
from shared.proto.scriptpkgs.v1 import common_pb2
from shared.wire import environment_entry_to_pb, environment_from_pb


class EnvironmentAdminMixin:
    _db: Database
    _hub: Hub

    async def ListEnvironments(
        self, request: pb.ListEnvironmentsRequest, context: object
    ) -> pb.ListEnvironmentsResponse:
        envs = await self._db.run(environments.ensure_default)
        return pb.ListEnvironmentsResponse(
            environments=[environment_entry_to_pb(e, i == 0) for i, e in enumerate(envs)]
        )

    async def AddEnvironment(
        self, request: pb.AddEnvironmentRequest, context: object
    ) -> common_pb2.Environment:
        if not request.HasField("environment"):
            raise InvalidArgument("environment", "is required")
        spec = request.environment
        target = environment_from_pb(spec.target)
        # Refused now rather than at the next install: a platform the resolver cannot target.
        uv_platform(resolution_target(validate_environment(spec.name, target), ""))
        env = await self._db.run(environments.add_environment, spec.name, target)
        envs = await self._db.run(environments.list_environments)
        await self._refresh_configured()
        return environment_entry_to_pb(env, envs[0].name == env.name)

    async def RemoveEnvironment(
        self, request: pb.RemoveEnvironmentRequest, context: object
    ) -> pb.RemoveEnvironmentResponse:
        removed = await self._db.run(environments.remove_environment, request.name)
        await self._refresh_configured()
        return pb.RemoveEnvironmentResponse(removed=removed)

    async def _refresh_configured(self) -> None:
        # Unserved satellites are told which environments exist; the release itself is unchanged.
        self._hub.publish(await self._db.run(load_desired))
