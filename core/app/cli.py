"""`spk-core`: serve, admin-token create, signing-key export."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from core.app import admin_cli, certs
from core.app.server import CoreConfig, CoreServer, prepare_data_dir
from core.app.storage_runtime import StorageRuntime
from core.state import lockfiles, tokens
from core.state.db import Database, open_database
from core.state.keys import SecretBox, load_or_create_key
from core.storage.blob_urls import BlobUrlPolicy
from core.storage.delta_plan import DeltaPolicy
from core.storage.gc import GcPolicy
from shared.cli import run_command
from shared.credentials import environ_with_credentials
from shared.errors import SpkError
from shared.logs import FORMATS
from shared.metrics_http import parse_listen
from shared.sd_notify import Notifier
from shared.signing import public_key_pem
from shared.tree_content import TreeContentPolicy

log = logging.getLogger("spk-core")
# The secrets `spk-core serve` reads from the environment, or from systemd credentials of the same
# name (docs/operations.md): the bootstrap admin token, the secret key, a Postgres URL with its
# password, and the S3 keys.
CREDENTIALS = (
    "SPK_ADMIN_TOKEN",
    "SPK_SECRET_KEY",
    "SPK_DATABASE_URL",
    "SPK_S3_ACCESS_KEY_ID",
    "SPK_S3_SECRET_ACCESS_KEY",
)
T = TypeVar("T", int, float)


def _non_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spk-core", description="script-packages core server")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any)")
    serve.add_argument(
        "--database-url",
        default=os.environ.get("SPK_DATABASE_URL"),
        help="postgresql://... to share state between core instances (default: SQLite in data dir)",
    )
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument(
        "--desired-poll-seconds",
        type=float,
        default=2.0,
        help="how often to re-read the desired hash (changes made by other core instances)",
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM): enables TLS")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="accept bearer tokens over plaintext from non-loopback peers (trusted networks only)",
    )
    serve.add_argument(
        "--gc-keep",
        type=_non_negative(int),
        default=1,
        help="blob GC keeps the desired lockfile and this many previous ones (default 1)",
    )
    serve.add_argument(
        "--gc-grace-hours",
        type=_non_negative(float),
        default=24.0,
        help="blob GC never deletes a blob younger than this (default 24)",
    )
    serve.add_argument(
        "--gc-interval-hours",
        type=_non_negative(float),
        default=24.0,
        help="scheduled blob GC pass every this many hours; 0 turns it off (default 24)",
    )
    serve.add_argument(
        "--allow-pth",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="accept PACKAGE's wheels although they ship a start-up hook (top-level .pth,"
        " sitecustomize); the hook is left out of every tree (repeatable; docs/sandbox.md)",
    )
    serve.add_argument(
        "--presign-blob-urls",
        action="store_true",
        help="hand satellites short-lived presigned GET URLs for blobs stored in S3, so the"
        " bytes come from the object store instead of through this core",
    )
    serve.add_argument(
        "--presign-ttl-seconds",
        type=_non_negative(int),
        default=900,
        help="how long a presigned URL is valid (default 900)",
    )
    serve.add_argument(
        "--blob-base-url",
        default="",
        help="a CDN or mirror serving the blob store read-only (<url>/ab/<sha256>.whl);"
        " satellites fetch from it, verify every byte, and fall back to this core",
    )
    serve.add_argument(
        "--audit-interval-hours",
        type=_non_negative(float),
        default=24.0,
        help="audit the desired release against the advisory source every this many hours;"
        " 0 turns the schedule off (audits after each publish and on demand remain; default 24)",
    )
    serve.add_argument(
        "--no-deltas",
        action="store_true",
        help="never offer binary deltas: every satellite pulls whole wheels",
    )
    serve.add_argument(
        "--delta-threshold",
        type=float,
        default=0.5,
        help="offer a patch only when it is smaller than this fraction of the wheel (default 0.5)",
    )
    serve.add_argument(
        "--delta-level",
        type=int,
        default=19,
        help="zstd level of patches: CPU once per pair against bytes per satellite (default 19)",
    )
    serve.add_argument(
        "--delta-max-window-log",
        type=int,
        default=27,
        help="a pair whose base + target exceed 2**N bytes gets no patch; bounds the memory of"
        " computing and applying one (default 27: 128 MiB)",
    )
    serve.add_argument(
        "--delta-workers",
        type=int,
        default=1,
        help="patches computed at once, each in a thread of its own (default 1)",
    )
    serve.add_argument(
        "--delta-wait-seconds",
        type=_non_negative(float),
        default=20.0,
        help="how long a satellite's GetDeltas waits for a patch being computed (default 20)",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=FORMATS, default="text", help="default text")

    tok = sub.add_parser("admin-token", help="manage admin tokens")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    create = tok_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--role", choices=tokens.ROLES, required=True)
    create.add_argument("--label", default="")
    create.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    create.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))

    admin_cli.add_parser(sub)

    certs_p = sub.add_parser("certs", help="a small CA and certificates for quick TLS setups")
    certs_sub = certs_p.add_subparsers(dest="action", required=True)
    init = certs_sub.add_parser("init", help="create ca.pem, server.pem/.key, client certs")
    init.add_argument("dir", type=Path)
    init.add_argument(
        "--host", action="append", default=[], help="server DNS name or IP (repeatable)"
    )
    init.add_argument(
        "--client", action="append", default=[], help="client cert name: a satellite or 'admin'"
    )

    tok_list = tok_sub.add_parser("list", help="ids, roles and labels (never the tokens)")
    tok_revoke = tok_sub.add_parser("revoke", help="delete a token by its id")
    tok_revoke.add_argument("id")
    for p_ in (tok_list, tok_revoke):
        p_.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
        p_.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))

    key = sub.add_parser("signing-key", help="the manifest signing key")
    key_sub = key.add_subparsers(dest="action", required=True)
    export = key_sub.add_parser("export", help="print the public key (PEM) for satellites to pin")
    export.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    export.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))
    rotate = key_sub.add_parser(
        "rotate", help="replace the signing key (restart the core; see docs/security.md)"
    )
    rotate.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    rotate.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))
    storage = sub.add_parser(
        "storage", help="offline storage work on a data dir (no server running on it)"
    )
    storage_sub = storage.add_subparsers(dest="action", required=True)
    move = storage_sub.add_parser(
        "migrate",
        help="copy every blob to TARGET (verified) and make it the active backend; the way off"
        " an instance-local backend before several instances share Postgres",
    )
    move.add_argument("target", help="database, s3 or filesystem")
    move.add_argument("--delete-source", action="store_true")
    move.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    move.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))
    return p


def _checked_base_url(url: str) -> str:
    if url and not url.startswith(("http://", "https://")):
        raise SpkError(f"--blob-base-url {url!r}: must be an http(s) URL")
    return url


def _delta_policy(args: argparse.Namespace) -> DeltaPolicy:
    try:
        return DeltaPolicy(
            enabled=not args.no_deltas,
            threshold=args.delta_threshold,
            level=args.delta_level,
            max_window_log=args.delta_max_window_log,
            workers=args.delta_workers,
            wait_seconds=args.delta_wait_seconds,
        )
    except ValueError as exc:
        raise SpkError(f"--delta-*: {exc}") from None


async def _migrate_offline(args: argparse.Namespace) -> int:
    """The online migration's code, run to its end in this process."""
    prepare_data_dir(args.data_dir)
    db = Database(await asyncio.to_thread(open_database, args.data_dir, args.database_url))
    shared = (args.database_url or "").startswith(("postgres://", "postgresql://"))
    try:
        storage = await StorageRuntime.open(
            db, args.data_dir, os.environ, shared=shared, allow_local=True
        )
        try:
            await storage.migrator.start(args.target, args.delete_source)
            await storage.migrator.wait()
            state = await storage.migrator.state()
        finally:
            await storage.stop()
    finally:
        await asyncio.to_thread(db.close)
    if state.status != "done":
        raise SpkError(f"the migration to {args.target} stopped: {state.error or state.status}")
    print(f"{state.done} blobs ({state.bytes} bytes) copied; {args.target} is the active backend")
    return 0


async def _serve(args: argparse.Namespace) -> None:
    # Secrets may come as systemd credentials (LoadCredential=NAME:path) instead of variables.
    environ = environ_with_credentials(CREDENTIALS)
    if args.metrics_listen:
        parse_listen(args.metrics_listen)  # a typo fails before the data dir is touched
    config = CoreConfig(
        data_dir=args.data_dir,
        listen=args.listen,
        database_url=args.database_url or environ.get("SPK_DATABASE_URL") or None,
        bootstrap_admin_token=environ.get(tokens.BOOTSTRAP_ENV) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
        desired_poll_seconds=args.desired_poll_seconds,
        gc=GcPolicy(
            keep_previous=args.gc_keep,
            grace_seconds=round(args.gc_grace_hours * 3600),
            interval_seconds=round(args.gc_interval_hours * 3600),
        ),
        blob_urls=BlobUrlPolicy(
            presign_s3=args.presign_blob_urls,
            presign_ttl_seconds=max(60, args.presign_ttl_seconds),
            base_url=_checked_base_url(args.blob_base_url),
        ),
        content=TreeContentPolicy.allowing(args.allow_pth),
        audit_interval_seconds=round(args.audit_interval_hours * 3600),
        deltas=_delta_policy(args),
        metrics_listen=args.metrics_listen,
        environ=environ,
    )
    core = CoreServer(config)
    notifier = Notifier.from_environ()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # a signal only sets it: the stop itself runs in this task
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with core:
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(core.port))
            tmp.replace(args.port_file)
        # Schema and storage migrations ran in start(): systemd may send traffic now.
        notifier.ready(f"serving on port {core.port}")
        async with notifier.watchdog():
            await stop.wait()
        notifier.stopping("draining calls")
        log.info("stopping: draining calls (health NOT_SERVING)")
    log.info("core stopped")


def _open(args: argparse.Namespace) -> tuple[Database, SecretBox]:
    prepare_data_dir(args.data_dir)
    box = SecretBox(load_or_create_key(args.data_dir))
    return Database(open_database(args.data_dir, args.database_url)), box


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "serve":
        asyncio.run(_serve(args))
    elif args.command == "admin-token":
        db, _ = _open(args)
        if args.action == "create":
            print(tokens.create_admin_token(args.role, args.label))
        elif args.action == "list":
            for token_id, role, label, created in tokens.list_admin_tokens():
                print(f"{token_id}  {role:<6}  {created}  {label}")
        else:
            tokens.revoke_admin_token(args.id)
        db.close()
    elif args.command == "admin":
        return admin_cli.run(args)
    elif args.command == "certs":
        for path in certs.init_dir(args.dir, args.host, args.client):
            print(path)
    elif args.command == "storage":
        return asyncio.run(_migrate_offline(args))
    elif args.command == "signing-key":
        db, box = _open(args)
        if args.action == "rotate":
            key = lockfiles.rotate_signing_key(box)
        else:
            key = lockfiles.load_or_create_signing_key(box)
        print(public_key_pem(key.public_key()), end="")
        db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(args, "log_level", "INFO")
    log_format = getattr(args, "log_format", "text")
    return run_command("spk-core", level, lambda: _dispatch(args), log_format)


if __name__ == "__main__":
    sys.exit(main())
