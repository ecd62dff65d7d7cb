"""`spk-core admin ...`: drive a running core from the shell (the same calls grpcurl makes).

The token comes from --token-file, SPK_ADMIN_TOKEN_FILE or SPK_ADMIN_TOKEN, never from argv
(argv is world-readable in /proc). Every call has a deadline. Output is a short human summary,
or the protobuf JSON with --json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from core.app import fleet_view, release_cli
from shared.errors import InvalidArgument, SpkError
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc, common_pb2

DEADLINE = 30.0
_STATUS = {v: k.removeprefix("INSTALL_STATUS_").lower() for k, v in pb.InstallStatus.items()}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("admin", help="call a running core's admin API")
    p.add_argument("--core", default=os.environ.get("SPK_CORE", "127.0.0.1:50051"))
    p.add_argument("--token-file", type=Path, default=os.environ.get("SPK_ADMIN_TOKEN_FILE"))
    p.add_argument("--ca-file", type=Path, help="CA to verify the core (TLS)")
    p.add_argument("--client-cert", type=Path)
    p.add_argument("--client-key", type=Path)
    p.add_argument("--json", action="store_true", help="print the protobuf JSON")
    cmd = p.add_subparsers(dest="admin_command", required=True)
    release_cli.add_commands(cmd)  # audit, audit-policy, export, tree (core/app/release_cli.py)

    pk = cmd.add_parser("packages", help="the allowlist").add_subparsers(dest="op", required=True)
    pk.add_parser("list")
    add = pk.add_parser("add", help="NAME==VERSION (upsert)")
    add.add_argument("pin")
    add.add_argument("--disabled", action="store_true")
    for op in ("remove", "enable", "disable"):
        pk.add_parser(op).add_argument("name")
    pk.add_parser(
        "set", help="replace all from a file of NAME==VERSION lines ('-': stdin)"
    ).add_argument("file")

    install = cmd.add_parser("install", help="InstallNow, then follow it until it settles")
    install.add_argument("--no-wait", action="store_true")
    install.add_argument(
        "--wait-fleet",
        action="store_true",
        help="then follow the fleet until every satellite runs the new release",
    )
    install.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="with --wait-fleet: seconds to wait for the fleet (default 600)",
    )
    cmd.add_parser("state")
    cmd.add_parser(
        "status", help="one screen: desired release, install, fleet, storage, migration, GC"
    )
    man = cmd.add_parser("manifest", help="a manifest by hash, or an environment's desired one")
    man.add_argument("hash", nargs="?", default="")
    man.add_argument("--environment", default="", help="default: the default environment")
    cmd.add_parser("lockfiles", help="every manifest in the history, newest first")
    cmd.add_parser("releases", help="every release (a manifest per environment), newest first")
    rb = cmd.add_parser("rollback", help="make a kept release desired again")
    rb.add_argument("hash", nargs="?", default="", help="any lockfile hash of the release")
    rb.add_argument("--release", type=int, default=0, help="the release's sequence number")

    envs = cmd.add_parser("envs", help="target environments (one manifest each per release)")
    env_ops = envs.add_subparsers(dest="op", required=True)
    env_ops.add_parser("list")
    env_add = env_ops.add_parser(
        "add", help="upsert by name; paste what `spk-satellite env` prints on a host"
    )
    env_add.add_argument("name")
    env_add.add_argument("--python", required=True, help="CPython X.Y, e.g. 3.12")
    env_add.add_argument("--abi", default="", help="default: cpXY")
    env_add.add_argument("--implementation", default="cp")
    env_add.add_argument(
        "--platform",
        action="append",
        required=True,
        help="the oldest platform the hosts run, e.g. manylinux_2_28_x86_64 (repeatable)",
    )
    env_ops.add_parser("remove").add_argument("name")

    reg = cmd.add_parser("registry").add_subparsers(dest="op", required=True)
    reg.add_parser("show")
    rset = reg.add_parser("set")
    rset.add_argument("--index-url")
    rset.add_argument("--extra-index-url", action="append")
    rset.add_argument("--username")
    rset.add_argument("--registry-token-file", type=Path, help="file holding the index token")
    rset.add_argument("--clear-token", action="store_true")
    rset.add_argument("--timeout", type=int)

    cap = cmd.add_parser("size-cap").add_subparsers(dest="op", required=True)
    cap.add_parser("show")
    cset = cap.add_parser("set", help="sizes in bytes or with a MiB/GiB suffix")
    cset.add_argument("warn")
    cset.add_argument("block")

    sats = cmd.add_parser("satellites").add_subparsers(dest="op", required=True)
    sats.add_parser("list")
    create = sats.add_parser("create", help="prints the token once (or writes --token-out)")
    create.add_argument("name")
    create.add_argument("--token-out", type=Path)
    sats.add_parser("revoke").add_argument("name")

    cmd.add_parser("search").add_argument("query")
    cmd.add_parser("versions").add_argument("name")
    gc = cmd.add_parser("gc", help="blob GC now")
    gc.add_argument("--dry-run", action="store_true")
    cmd.add_parser("gc-state")
    st = cmd.add_parser("storage").add_subparsers(dest="op", required=True)
    st.add_parser("list")
    st.add_parser("set").add_argument("name")
    mig = st.add_parser("migrate")
    mig.add_argument("target")
    mig.add_argument("--delete-source", action="store_true")
    st.add_parser("migration-state")


def parse_size(text: str, field: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "b": 1}
    low = text.strip().lower()
    for suffix, factor in units.items():
        if low.endswith(suffix) and low[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(low[: -len(suffix)]) * factor)
    if low.isdigit():
        return int(low)
    raise InvalidArgument(field, f"{text!r} is not a size (bytes, or e.g. 150MiB)")


def parse_pin(text: str, field: str = "pin") -> pb.PackageSpec:
    name, sep, version = text.strip().partition("==")
    if not sep:
        raise InvalidArgument(field, f"{text!r} must be NAME==VERSION")
    return pb.PackageSpec(name=name.strip(), version=version.strip())


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise SpkError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    if token := os.environ.get("SPK_ADMIN_TOKEN"):
        return token
    raise SpkError("no admin token: pass --token-file or set SPK_ADMIN_TOKEN_FILE/SPK_ADMIN_TOKEN")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca_file is None:
        return grpc.insecure_channel(args.core)

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(
        read(args.ca_file), read(args.client_key), read(args.client_cert)
    )
    return grpc.secure_channel(args.core, creds)


class _Admin:
    def __init__(self, stub: admin_pb2_grpc.PackageAdminStub, token: str) -> None:
        self._stub = stub
        self._md = (("authorization", f"Bearer {token}"),)

    def __call__(self, method: str, request: Message) -> Any:
        return getattr(self._stub, method)(request, metadata=self._md, timeout=DEADLINE)

    def stream(self, method: str, request: Message) -> Any:
        return getattr(self._stub, method)(request, metadata=self._md)


def _install_line(s: pb.InstallState) -> str:
    status = _STATUS.get(s.status, "?")
    parts = [f"status={status}", f"hash={s.lockfile_hash or '-'}"]
    if s.release_sequence:
        parts.append(f"release={s.release_sequence}")
    if s.phase:
        parts.append(f"phase={s.phase} {s.wheels_done}/{s.wheels_total}")
    if s.total_bytes:
        parts.append(f"bytes={s.total_bytes}")
    if len(s.environments) > 1 or (s.environments and s.status != pb.INSTALL_STATUS_READY):
        parts.append(
            "envs: "
            + ", ".join(
                f"{e.name}={e.status}" + (f" {e.lockfile_hash[:12]}" if e.lockfile_hash else "")
                for e in s.environments
            )
        )
    parts += [f"warning: {w}" for w in s.warnings]
    if s.error:
        parts.append(f"error: {s.error}")
    return "  ".join(parts)


def _env_line(e: common_pb2.Environment) -> str:
    t = e.target
    plats = t.platform or "(the core's own platform)"
    default = "  (default)" if e.is_default else ""
    return f"{e.name:<16} python {t.python_version:<5} {t.abi or '-':<6} {plats}{default}"


def _summary(reply: Message) -> str:
    if isinstance(reply, pb.InstallState):
        return _install_line(reply)
    if isinstance(reply, pb.ListPackagesResponse):
        return "\n".join(
            f"{p.name}=={p.version}{'' if p.enabled else '  (disabled)'}" for p in reply.packages
        )
    if isinstance(reply, pb.ListSatellitesResponse):
        return fleet_view.satellites_table(reply, time.time())
    if isinstance(reply, pb.ListEnvironmentsResponse):
        return "\n".join(_env_line(e) for e in reply.environments)
    if isinstance(reply, common_pb2.Environment):
        return _env_line(reply)
    if isinstance(reply, pb.ListReleasesResponse):
        return "\n".join(
            f"{'*' if r.current else ' '} release {r.sequence}  "
            + ", ".join(f"{m.environment}={m.lockfile_hash[:12]}" for m in r.manifests)
            for r in reply.releases
        )
    if isinstance(reply, pb.ListLockfilesResponse):
        return "\n".join(
            f"{'*' if lf.current else ' '} {lf.lockfile_hash}  seq={lf.sequence}  "
            f"{lf.environment or '-'}  {lf.entry_count} wheels  {lf.total_size} bytes"
            for lf in reply.lockfiles
        )
    return json_format.MessageToJson(reply, preserving_proto_field_name=True).strip()


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    c, op = args.admin_command, getattr(args, "op", None)
    simple: dict[tuple[str, str | None], Callable[[], tuple[str, Message]]] = {
        ("packages", "list"): lambda: ("ListPackages", pb.ListPackagesRequest()),
        ("packages", "remove"): lambda: ("RemovePackage", pb.RemovePackageRequest(name=args.name)),
        ("packages", "enable"): lambda: (
            "SetPackageEnabled",
            pb.SetPackageEnabledRequest(name=args.name, enabled=True),
        ),
        ("packages", "disable"): lambda: (
            "SetPackageEnabled",
            pb.SetPackageEnabledRequest(name=args.name, enabled=False),
        ),
        ("state", None): lambda: ("GetInstallState", pb.GetInstallStateRequest()),
        ("manifest", None): lambda: (
            "GetManifest",
            pb.AdminGetManifestRequest(lockfile_hash=args.hash, environment=args.environment),
        ),
        ("lockfiles", None): lambda: ("ListLockfiles", pb.ListLockfilesRequest()),
        ("releases", None): lambda: ("ListReleases", pb.ListReleasesRequest()),
        ("rollback", None): lambda: (
            "Rollback",
            pb.RollbackRequest(lockfile_hash=args.hash, release_sequence=args.release),
        ),
        ("envs", "list"): lambda: ("ListEnvironments", pb.ListEnvironmentsRequest()),
        ("envs", "remove"): lambda: (
            "RemoveEnvironment",
            pb.RemoveEnvironmentRequest(name=args.name),
        ),
        ("envs", "add"): lambda: (
            "AddEnvironment",
            pb.AddEnvironmentRequest(
                environment=common_pb2.Environment(
                    name=args.name,
                    target=common_pb2.TargetEnvironment(
                        python_version=args.python,
                        implementation=args.implementation,
                        abi=args.abi,
                        platform=",".join(args.platform),
                    ),
                )
            ),
        ),
        ("registry", "show"): lambda: ("GetRegistryConfig", pb.GetRegistryConfigRequest()),
        ("size-cap", "show"): lambda: ("GetSizeCap", pb.GetSizeCapRequest()),
        ("satellites", "list"): lambda: ("ListSatellites", pb.ListSatellitesRequest()),
        ("satellites", "create"): lambda: (
            "CreateSatellite",
            pb.CreateSatelliteRequest(name=args.name),
        ),
        ("satellites", "revoke"): lambda: (
            "RevokeSatellite",
            pb.RevokeSatelliteRequest(name=args.name),
        ),
        ("search", None): lambda: ("SearchPackages", pb.SearchPackagesRequest(query=args.query)),
        ("versions", None): lambda: (
            "GetPackageVersions",
            pb.GetPackageVersionsRequest(name=args.name),
        ),
        ("gc", None): lambda: ("GcBlobs", pb.GcBlobsRequest(dry_run=args.dry_run)),
        ("gc-state", None): lambda: ("GetBlobGcState", pb.GetBlobGcStateRequest()),
        ("storage", "list"): lambda: ("ListStorageBackends", pb.ListStorageBackendsRequest()),
        ("storage", "set"): lambda: (
            "SetStorageBackend",
            pb.SetStorageBackendRequest(name=args.name),
        ),
        ("storage", "migrate"): lambda: (
            "MigrateStorage",
            pb.MigrateStorageRequest(target=args.target, delete_source=args.delete_source),
        ),
        ("storage", "migration-state"): lambda: (
            "GetStorageMigrationState",
            pb.GetStorageMigrationStateRequest(),
        ),
        ("install", None): lambda: ("InstallNow", pb.InstallNowRequest()),
    }
    if (c, op) in simple:
        return simple[(c, op)]()
    if (c, op) == ("packages", "add"):
        spec = parse_pin(args.pin)
        return "AddPackage", pb.AddPackageRequest(
            name=spec.name, version=spec.version, enabled=not args.disabled
        )
    if (c, op) == ("packages", "set"):
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
        specs = [parse_pin(ln, f"{args.file}:{i}") for i, ln in enumerate(lines, 1) if ln]
        return "SetPackages", pb.SetPackagesRequest(packages=specs)
    if (c, op) == ("size-cap", "set"):
        return "SetSizeCap", pb.SizeCap(
            warn_bytes=parse_size(args.warn, "warn"), block_bytes=parse_size(args.block, "block")
        )
    if (c, op) == ("registry", "set"):
        req = pb.SetRegistryConfigRequest()
        if args.index_url is not None:
            req.index_url = args.index_url
        if args.extra_index_url is not None:
            req.extra_index_urls.extend(args.extra_index_url)
            req.replace_extra_index_urls = True
        if args.username is not None:
            req.username = args.username
        if args.clear_token:
            req.auth_token = ""
        elif args.registry_token_file is not None:
            req.auth_token = args.registry_token_file.read_text().strip()
        if args.timeout is not None:
            req.timeout_seconds = args.timeout
        return "SetRegistryConfig", req
    raise InvalidArgument("command", f"unknown admin command {c} {op or ''}".strip())


def _status(admin: _Admin, as_json: bool) -> int:
    replies = fleet_view.collect_status(admin)
    print(
        fleet_view.status_json(replies)
        if as_json
        else fleet_view.status_screen(replies, time.time())
    )
    return 0


def _install(admin: _Admin, args: argparse.Namespace, reply: Any) -> int:
    """Follow WatchInstall to its end; with --wait-fleet, then the fleet."""
    for state in admin.stream("WatchInstall", pb.WatchInstallRequest()):
        if not args.json:
            print(_install_line(state), flush=True)
        reply = state
    if args.json:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    if reply.status != pb.INSTALL_STATUS_READY:
        return 1
    if not args.wait_fleet:
        return 0
    return fleet_view.wait_fleet(
        lambda: admin("ListSatellites", pb.ListSatellitesRequest()),
        args.timeout,
        out=sys.stderr if args.json else sys.stdout,
    )


def run(args: argparse.Namespace) -> int:
    """Returns the exit code: 0 ok, 1 a refused call, a failed install or a fleet that did not
    converge in time (--wait-fleet)."""
    if args.admin_command in release_cli.COMMANDS:
        with _channel(args) as channel:
            stub = admin_pb2_grpc.PackageAdminStub(channel)
            return release_cli.run(args, _Admin(stub, _token(args)))
    if args.admin_command == "status":
        method, request = "", None
    else:
        method, request = _request(args)
    with _channel(args) as channel:
        admin = _Admin(admin_pb2_grpc.PackageAdminStub(channel), _token(args))
        try:
            if request is None:
                return _status(admin, args.json)
            reply = admin(method, request)
            if method == "InstallNow" and not args.no_wait:
                return _install(admin, args, reply)
        except grpc.RpcError as exc:
            print(f"spk-core admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if method == "CreateSatellite" and args.token_out is not None:
        fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(reply.token)
        print(f"token for {reply.name} written to {args.token_out}")
        return 0
    print(
        json_format.MessageToJson(reply, preserving_proto_field_name=True)
        if args.json
        else _summary(reply)
    )
    return 0
