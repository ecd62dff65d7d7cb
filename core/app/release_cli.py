"""`spk-core admin audit | audit-policy | export | tree`: what a release ships, and copies of it.

Hooked into core/app/admin_cli.py (same flags, token rules and channel); these commands live here
so they stay out of the way of the rest of the admin CLI.

    audit [HASH] [--release N] [--last] [--history N]   exit 0 when the audit is complete
                                                        (status ok), 1 when it is unknown
    audit-policy show | set ... | ignore ID --reason R | unignore ID
    export [HASH] --format pylock|requirements [--environment NAME] [-o FILE]
    tree HASH DIR [--signing-key PEM]                   prints DIR/site-packages
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from core.app.tree_export import materialise_tree
from shared.errors import IntegrityError, NotFound
from shared.manifest import Manifest
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb
from shared.signing import load_public_key_pem
from shared.wire import manifest_from_pb

COMMANDS = ("audit", "audit-policy", "export", "tree")
SEVERITY_CHOICES = ("none", "low", "medium", "high", "critical")


class AdminCalls(Protocol):
    """admin_cli's caller: unary calls with a deadline, streams without."""

    def __call__(self, method: str, request: Message) -> Any: ...

    def stream(self, method: str, request: Message) -> Any: ...


def add_commands(cmd: Any) -> None:
    audit = cmd.add_parser("audit", help="audit a release now (every environment's wheels)")
    audit.add_argument("hash", nargs="?", default="", help="any lockfile hash of the release")
    audit.add_argument("--release", type=int, default=0, help="the release's sequence number")
    audit.add_argument("--last", action="store_true", help="show the recorded audit, no query")
    audit.add_argument("--history", type=int, default=0, help="with --last: older audits too")

    pol = cmd.add_parser("audit-policy", help="advisory source, blocking, ignores")
    ops = pol.add_subparsers(dest="op", required=True)
    ops.add_parser("show")
    pset = ops.add_parser("set")
    pset.add_argument("--source", choices=("json", "osv", "off"))
    pset.add_argument("--url", help="json: the JSON API base (''=derived); osv: the endpoint")
    pset.add_argument("--block", choices=SEVERITY_CHOICES, help="refuse publishing at or above")
    pset.add_argument("--unknown-as", choices=SEVERITY_CHOICES[1:])
    pset.add_argument("--timeout", type=int, help="seconds a whole audit may take")
    ign = ops.add_parser("ignore", help="accept an advisory (by id or alias) with a reason")
    ign.add_argument("advisory_id")
    ign.add_argument("--reason", required=True)
    ops.add_parser("unignore").add_argument("advisory_id")

    exp = cmd.add_parser("export", help="a manifest as pylock.toml or requirements.txt")
    exp.add_argument("hash", nargs="?", default="")
    exp.add_argument("--format", choices=("pylock", "requirements"), default="pylock")
    exp.add_argument("--environment", default="", help="default: the default environment")
    exp.add_argument("-o", "--output", type=Path, help="write here instead of stdout")

    tree = cmd.add_parser("tree", help="build a release's tree from the core's blobs into DIR")
    tree.add_argument("hash")
    tree.add_argument("dir", type=Path)
    tree.add_argument("--signing-key", type=Path, help="the core's public key (PEM) to verify")


def _when(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix)) if unix else "-"


def audit_text(a: pb.ReleaseAudit) -> str:
    lines = [
        f"release {a.release_sequence}  status={a.status}  source={a.source}"
        f"  checked={_when(a.checked_at_unix)}  trigger={a.trigger}"
        f"  packages={a.packages_checked}"
    ]
    if a.reason:
        lines.append(f"reason: {a.reason}")
    lines.append("counts: " + " ".join(f"{c.severity}={c.count}" for c in a.counts))
    new = set(a.new_advisories)
    for adv in a.advisories:
        ids = adv.id + (f" ({', '.join(adv.aliases)})" if adv.aliases else "")
        fixed = f"  fixed in {', '.join(adv.fixed_in)}" if adv.fixed_in else ""
        tag = "ignored" if adv.ignored else adv.severity
        lines.append(
            f"  {tag:<8} {adv.package} {adv.version}  {ids}{fixed}"
            f"  [{', '.join(adv.environments)}]{'  NEW' if adv.id in new else ''}"
        )
        if adv.summary:
            lines.append(f"           {adv.summary}")
        if adv.ignored:
            lines.append(f"           ignored: {adv.ignore_reason}")
    lines += [f"warning: {w}" for w in a.warnings]
    return "\n".join(lines)


def policy_text(p: pb.AuditPolicy) -> str:
    lines = [
        f"source={p.source}{' ' + p.url if p.url else ''}"
        f"  block={p.block_severity or 'none (report only)'}  unknown_as={p.unknown_as}"
        f"  timeout={p.timeout_seconds}s  schedule="
        + (f"every {p.interval_seconds / 3600:g} h" if p.interval_seconds else "off")
        + (f"  next={_when(p.next_run_unix)}" if p.next_run_unix else "")
    ]
    lines += [
        f"  ignore {i.advisory_id}: {i.reason}  ({i.added_by or '?'}, {_when(i.added_at_unix)})"
        for i in p.ignores
    ]
    return "\n".join(lines)


class _CoreSource:
    """tree_export.ReleaseSource over the admin API."""

    def __init__(self, admin: AdminCalls) -> None:
        self._admin = admin

    def manifest(self, lockfile_hash: str) -> Manifest:
        reply = self._admin("GetManifest", pb.AdminGetManifestRequest(lockfile_hash=lockfile_hash))
        return manifest_from_pb(reply)

    def blob(self, sha256: str) -> Iterable[bytes]:
        def chunks() -> Iterator[bytes]:
            offset = 0
            for chunk in self._admin.stream("GetBlob", pb.GetBlobRequest(sha256=sha256)):
                if chunk.offset != offset:
                    raise IntegrityError(f"blob {sha256}: chunk at {chunk.offset}, not {offset}")
                offset += len(chunk.data)
                yield chunk.data

        return chunks()


def _policy_request(args: argparse.Namespace, admin: AdminCalls) -> Message:
    if args.op == "set":
        req = pb.SetAuditPolicyRequest()
        if args.source is not None:
            req.source = args.source
        if args.url is not None:
            req.url = args.url
        if args.block is not None:
            req.block_severity = "" if args.block == "none" else args.block
        if args.unknown_as is not None:
            req.unknown_as = args.unknown_as
        if args.timeout is not None:
            req.timeout_seconds = args.timeout
        return req
    current: pb.AuditPolicy = admin("GetAuditPolicy", pb.GetAuditPolicyRequest())
    keep = [i for i in current.ignores if i.advisory_id.upper() != args.advisory_id.upper()]
    if args.op == "unignore" and len(keep) == len(current.ignores):
        raise NotFound(f"{args.advisory_id} is not on the ignore list")
    if args.op == "ignore":
        keep.append(pb.AuditIgnore(advisory_id=args.advisory_id, reason=args.reason))
    return pb.SetAuditPolicyRequest(ignores=keep, replace_ignores=True)


def _print(reply: Message, as_json: bool, text: str) -> None:
    print(json_format.MessageToJson(reply, preserving_proto_field_name=True) if as_json else text)


def _run(args: argparse.Namespace, admin: AdminCalls) -> int:
    c = args.admin_command
    if c == "audit":
        if args.last:
            request = pb.GetAuditRequest(
                release_sequence=args.release, lockfile_hash=args.hash, history=args.history
            )
            got: pb.GetAuditResponse = admin("GetAudit", request)
            if not got.HasField("latest"):
                print("this release was never audited", file=sys.stderr)
                return 1
            audits = [got.latest, *got.history]
            _print(got, args.json, "\n\n".join(audit_text(a) for a in audits))
            return 0 if got.latest.status == "ok" else 1
        audit: pb.ReleaseAudit = admin(
            "AuditRelease",
            pb.AuditReleaseRequest(release_sequence=args.release, lockfile_hash=args.hash),
        )
        _print(audit, args.json, audit_text(audit))
        return 0 if audit.status == "ok" else 1
    if c == "audit-policy":
        if args.op == "show":
            policy = admin("GetAuditPolicy", pb.GetAuditPolicyRequest())
        else:
            policy = admin("SetAuditPolicy", _policy_request(args, admin))
        _print(policy, args.json, policy_text(policy))
        return 0
    if c == "export":
        wanted = pb.GetReleaseExportRequest(
            lockfile_hash=args.hash, environment=args.environment, format=args.format
        )
        export: pb.ReleaseExport = admin("GetReleaseExport", wanted)
        if args.output is not None:
            args.output.write_text(export.content)
            print(f"{export.filename} for {export.environment} {export.lockfile_hash[:12]}"
                  f" written to {args.output}", file=sys.stderr)  # fmt: skip
        else:
            sys.stdout.write(export.content)
        return 0
    key = load_public_key_pem(args.signing_key.read_bytes()) if args.signing_key else None
    site = materialise_tree(_CoreSource(admin), args.hash, args.dir, key)
    print(site)
    return 0


def run(args: argparse.Namespace, admin: AdminCalls) -> int:
    """Returns the exit code; a refused call prints its status and returns 1."""
    try:
        return _run(args, admin)
    except grpc.RpcError as exc:
        print(f"spk-core admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
