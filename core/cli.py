"""`spk-core`: serve, admin-token create, signing-key export."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from core import auth, certs, lockfiles
from core.db import Database, open_database
from core.secrets import SecretBox, load_or_create_key
from core.server import CoreConfig, CoreServer, prepare_data_dir
from shared.errors import SpkError
from shared.signing import public_key_pem

log = logging.getLogger("spk-core")


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
    serve.add_argument("--log-level", default="INFO")

    tok = sub.add_parser("admin-token", help="manage admin tokens")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    create = tok_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--role", choices=auth.ROLES, required=True)
    create.add_argument("--label", default="")
    create.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    create.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))

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

    key = sub.add_parser("signing-key", help="the manifest signing key")
    key_sub = key.add_subparsers(dest="action", required=True)
    export = key_sub.add_parser("export", help="print the public key (PEM) for satellites to pin")
    export.add_argument("--data-dir", type=Path, default=Path("spk-core-data"))
    export.add_argument("--database-url", default=os.environ.get("SPK_DATABASE_URL"))
    return p


async def _serve(args: argparse.Namespace) -> None:
    config = CoreConfig(
        data_dir=args.data_dir,
        listen=args.listen,
        database_url=args.database_url,
        bootstrap_admin_token=os.environ.get(auth.BOOTSTRAP_ENV) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
    )
    core = CoreServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(core.stop()))
    async with core:
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(core.port))
            tmp.replace(args.port_file)
        await core.wait()
    log.info("core stopped")


def _open(args: argparse.Namespace) -> tuple[Database, SecretBox]:
    prepare_data_dir(args.data_dir)
    box = SecretBox(load_or_create_key(args.data_dir))
    return Database(open_database(args.data_dir, args.database_url)), box


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        if args.command == "serve":
            asyncio.run(_serve(args))
        elif args.command == "admin-token":
            db, _ = _open(args)
            print(auth.create_admin_token(args.role, args.label))
            db.close()
        elif args.command == "certs":
            for path in certs.init_dir(args.dir, args.host, args.client):
                print(path)
        elif args.command == "signing-key":
            db, box = _open(args)
            print(public_key_pem(lockfiles.load_or_create_signing_key(box).public_key()), end="")
            db.close()
    except SpkError as exc:
        print(f"spk-core: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
