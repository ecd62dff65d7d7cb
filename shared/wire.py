"""Conversions between the manifest model and its protobuf form (used by servicers and clients)."""

from __future__ import annotations

from shared.environments import Environment, HostEnvironment
from shared.errors import InvalidArgument
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from shared.proto.scriptpkgs.v1 import common_pb2


def environment_to_pb(env: TargetEnvironment) -> common_pb2.TargetEnvironment:
    return common_pb2.TargetEnvironment(
        python_version=env.python_version,
        implementation=env.implementation,
        abi=env.abi,
        platform=env.platform,
    )


def environment_from_pb(pb: common_pb2.TargetEnvironment) -> TargetEnvironment:
    return TargetEnvironment(
        python_version=pb.python_version,
        implementation=pb.implementation,
        abi=pb.abi,
        platform=pb.platform,
    )


def manifest_to_pb(m: Manifest) -> common_pb2.Manifest:
    return common_pb2.Manifest(
        lockfile_hash=m.lockfile_hash,
        entries=[
            common_pb2.ManifestEntry(
                name=e.name,
                version=e.version,
                filename=e.filename,
                sha256=e.sha256,
                size=e.size,
                requested=e.requested,
            )
            for e in m.entries
        ],
        environment=environment_to_pb(m.environment),
        sequence=m.sequence,
        created_at_unix=m.created_at_unix,
        signature=m.signature,
        signing_key_id=m.signing_key_id,
        total_size=m.total_size,
    )


def manifest_from_pb(pb: common_pb2.Manifest) -> Manifest:
    return Manifest(
        lockfile_hash=pb.lockfile_hash,
        entries=tuple(
            ManifestEntry(
                name=e.name,
                version=e.version,
                filename=e.filename,
                sha256=e.sha256,
                size=e.size,
                requested=e.requested,
            )
            for e in pb.entries
        ),
        environment=environment_from_pb(pb.environment),
        sequence=pb.sequence,
        created_at_unix=pb.created_at_unix,
        signature=pb.signature,
        signing_key_id=pb.signing_key_id,
    )


MAX_HOST_PLATFORMS = 256  # a real host lists ~40; more is a broken or hostile agent
MAX_TAG = 64


def host_to_pb(host: HostEnvironment) -> common_pb2.HostEnvironment:
    return common_pb2.HostEnvironment(
        python_version=host.python_version,
        implementation=host.implementation,
        abi=host.abi,
        platforms=list(host.platforms),
    )


def host_from_pb(pb: common_pb2.HostEnvironment) -> HostEnvironment | None:
    """None for an empty message (an agent that does not describe itself); InvalidArgument
    for one that is too big to be a real host."""
    if not pb.python_version:
        return None
    if len(pb.platforms) > MAX_HOST_PLATFORMS:
        raise InvalidArgument("host.platforms", f"at most {MAX_HOST_PLATFORMS} tags")
    for name, value in (
        ("host.python_version", pb.python_version),
        ("host.implementation", pb.implementation),
        ("host.abi", pb.abi),
        *(("host.platforms", p) for p in pb.platforms),
    ):
        if len(value) > MAX_TAG or not value.isascii() or not value.isprintable():
            raise InvalidArgument(name, f"must be a printable tag of at most {MAX_TAG} characters")
    return HostEnvironment(pb.python_version, pb.implementation, pb.abi, tuple(pb.platforms))


def environment_entry_to_pb(env: Environment, is_default: bool) -> common_pb2.Environment:
    return common_pb2.Environment(
        name=env.name, target=environment_to_pb(env.target), is_default=is_default
    )
