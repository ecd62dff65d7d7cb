"""`spk-satellite`: agent, run, status."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path

from satellite import editor, runner
from satellite.host_policy import host_policy_path, install_host_policy, load_host_policy
from satellite.run_outcome import RunLog, describe_record, follow_run_log
from satellite.run_stats import counted_run
from satellite.store import SatelliteStore
from shared.cli import run_command
from shared.errors import SpkError
from shared.logs import FORMATS

DEFAULT_DATA_DIR = Path("spk-satellite-data")
log = logging.getLogger("satellite.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spk-satellite", description="script-packages satellite")
    sub = p.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="keep this host in sync with the core")
    agent.add_argument("--core", required=True, help="HOST:PORT of a core instance")
    agent.add_argument("--token-file", type=Path, required=True, help="file holding the token")
    agent.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    key = agent.add_mutually_exclusive_group()
    key.add_argument("--signing-key", type=Path, help="the core's public key (PEM) to pin")
    key.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="fetch the core's key on first contact and pin it (logged loudly)",
    )
    agent.add_argument("--ca-file", type=Path, help="CA bundle to verify the core (enables TLS)")
    agent.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mTLS")
    agent.add_argument("--client-key", type=Path, help="client private key (PEM) for mTLS")
    agent.add_argument(
        "--insecure",
        action="store_true",
        help="send the token over plaintext to a non-loopback core (trusted networks only)",
    )
    agent.add_argument(
        "--tree-grace", type=float, default=3600.0, help="seconds a superseded tree is kept"
    )
    agent.add_argument(
        "--tree-gc-interval",
        type=float,
        default=60.0,
        help="seconds between tree GC passes besides the one after each flip (0: only those)",
    )
    agent.add_argument("--no-drift-watch", action="store_true", help="disable drift repair")
    agent.add_argument(
        "--policy-file",
        type=Path,
        help="a sandbox policy (TOML, owned by root) made mandatory for every run on this data"
        " dir: linked as <data-dir>/sandbox-policy.toml (docs/sandbox.md)",
    )
    agent.add_argument(
        "--retry-base", type=float, default=2.0, help="first wait (s) before retrying a failed sync"
    )
    agent.add_argument(
        "--retry-cap", type=float, default=300.0, help="longest wait (s) between sync retries"
    )
    agent.add_argument(
        "--no-blob-urls",
        action="store_true",
        help="ignore blob URLs the core hands out (presigned, CDN): every byte through the core",
    )
    agent.add_argument(
        "--blob-base-url",
        default="",
        help="a mirror of the core's blob store near this host (<url>/ab/<sha256>.whl); bytes"
        " are verified and any failure falls back to the core",
    )
    agent.add_argument(
        "--no-deltas",
        action="store_true",
        help="never ask the core for binary patches: pull whole wheels",
    )
    agent.add_argument(
        "--delta-max-window-log",
        type=int,
        default=27,
        help="refuse patches needing a zstd window above 2**N bytes of memory (default 27)",
    )
    agent.add_argument(
        "--delta-wait",
        type=_delta_wait,
        default=None,
        metavar="SECONDS|auto",
        help="how long the core may wait for a patch it is still computing (default auto:"
        " half the time this host's measured link needs for the whole wheels; the core caps"
        " it at its --delta-wait-seconds)",
    )
    agent.add_argument(
        "--keep-delta-bases",
        type=int,
        default=1,
        help="store GC keeps this many other versions of each distribution in use, as bases"
        " for the next upgrade's patches (default 1)",
    )
    agent.add_argument(
        "--max-store-bytes",
        type=_size,
        default=0,
        help="cap on blobs/ + pkgs/ (e.g. 2G, 500M): past it store GC evicts delta bases, then"
        " retired trees within grace, oldest first; never the current or a pinned tree"
        " (default 0: no cap)",
    )
    agent.add_argument(
        "--store-gc-interval",
        type=float,
        default=3600.0,
        help="seconds between scheduled store GC passes, besides the one after each flip;"
        " 0: only after flips (default 3600)",
    )
    agent.add_argument(
        "--no-store-gc", action="store_true", help="never delete blobs or unpacked packages"
    )
    agent.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    agent.add_argument("--log-level", default="INFO")
    agent.add_argument("--log-format", choices=FORMATS, default="text", help="default text")

    run = sub.add_parser(
        "run",
        help="run a script against the current package tree",
        usage="spk-satellite run [--data-dir DIR] [--sandbox[=POLICY]] script [args ...]",
    )
    run.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    run.add_argument(
        "--sandbox",
        action="store_true",
        help="run sandboxed (no network, read-only system, limits; docs/sandbox.md);"
        " --sandbox=POLICY names a preset (default, loopback, network) or a policy file."
        " A host policy (<data-dir>/sandbox-policy.toml) sandboxes every run regardless",
    )
    run.add_argument("--sandbox-policy", help=argparse.SUPPRESS)  # what --sandbox=X becomes
    run.add_argument("script", type=Path)
    run.add_argument("args", nargs=argparse.REMAINDER)

    status = sub.add_parser("status", help="desired and current hash, state, last error")
    status.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    status.add_argument("--json", action="store_true")

    env = sub.add_parser(
        "env", help="this host's environment, as `spk-core admin envs add` takes it"
    )
    env.add_argument("--name", default="", help="the environment name to suggest")
    env.add_argument("--json", action="store_true", help="interpreter, abi and every platform tag")
    env.add_argument(
        "--paths",
        action="store_true",
        help="print the current tree's site-packages for editors (--json: with the interpreter)",
    )
    env.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="with --paths")
    return p


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """`1500000`, `500M`, `2G` (binary units): a byte count for --max-store-bytes."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)] if unit else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (say 500M or 2G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return int(value * _UNITS[unit])


def _delta_wait(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither seconds nor 'auto'") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {text}")
    return seconds


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SpkError(f"cannot read {flag} {path}: {exc.strerror}") from None


def _print_env(name: str, as_json: bool) -> None:
    import dataclasses

    from shared import tags

    host = tags.describe_host()
    suggested = name or f"{host.abi}-{host.best_platform}"
    if as_json:
        doc = {
            **dataclasses.asdict(host),
            "environment": {
                "name": suggested,
                "python_version": host.minor,
                "implementation": host.implementation,
                "abi": host.abi,
                "platform": host.best_platform,
            },
            "add_command": host.add_command(suggested),
        }
        print(json.dumps(doc, indent=2))
        return
    print(host.add_command(suggested))


async def _agent(args: argparse.Namespace) -> int:
    import asyncio

    # grpc, asyncio and prometheus_client: `run` need not pay for them
    from satellite.agent import Agent, AgentConfig
    from satellite.metrics import AgentMetrics
    from satellite.sync import ReconcileResult, StoreGcPolicy
    from shared.metrics_http import MetricsServer
    from shared.sd_notify import Notifier

    if args.policy_file is not None:
        installed = install_host_policy(args.data_dir, args.policy_file)
        log.info("script runs on this host are sandboxed: %s", installed.policy.describe())
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        raise SpkError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    if not token:
        raise SpkError(f"--token-file {args.token_file} is empty")
    if args.ca_file is None and not args.insecure and not is_loopback_target(args.core):
        raise SpkError(
            f"refusing to send the satellite token in plaintext to {args.core}: pass --ca-file"
            " for TLS, or --insecure on a trusted network"
        )
    if (args.client_cert is None) != (args.client_key is None):
        raise SpkError("mTLS needs both --client-cert and --client-key")
    config = AgentConfig(
        core=args.core,
        token=token,
        data_dir=args.data_dir,
        signing_key_pem=_read(args.signing_key, "--signing-key").decode()
        if args.signing_key
        else None,
        trust_on_first_use=args.trust_on_first_use,
        ca_certificates=_read(args.ca_file, "--ca-file") if args.ca_file else None,
        client_cert=_read(args.client_cert, "--client-cert") if args.client_cert else None,
        client_key=_read(args.client_key, "--client-key") if args.client_key else None,
        tree_grace_seconds=args.tree_grace,
        tree_gc_interval=args.tree_gc_interval,
        watch_drift=not args.no_drift_watch,
        retry_base=args.retry_base,
        retry_cap=args.retry_cap,
        blob_urls=not args.no_blob_urls,
        blob_base_url=args.blob_base_url,
        deltas=not args.no_deltas,
        max_window_log=args.delta_max_window_log,
        delta_wait_seconds=args.delta_wait,
        store_gc=StoreGcPolicy(
            enabled=not args.no_store_gc,
            keep_bases=max(0, args.keep_delta_bases),
            max_store_bytes=args.max_store_bytes,
            interval_seconds=max(0.0, args.store_gc_interval),
        ),
    )
    metrics = AgentMetrics() if args.metrics_listen else None
    served = MetricsServer.start(args.metrics_listen, metrics.registry) if metrics else None
    if served is not None:
        logging.getLogger(__name__).info("metrics on %s", served.url)
    agent = Agent.from_config(config, metrics=metrics)
    notifier = Notifier.from_environ()
    if notifier.active:

        def show(result: ReconcileResult) -> None:  # `systemctl status` shows the last sync
            verb = "synced" if result.ok else "sync failed:"
            notifier.status(
                f"{verb} {result.lockfile_hash[:12] or '(nothing desired)'}"
                + ("" if result.ok else f" {result.error[:200]}")
            )

        agent.on_result = show
    loop = asyncio.get_running_loop()
    task = agent.start()
    # Runs record their outcome in the data dir; the agent's log and metrics carry them.
    runs_log = logging.getLogger("satellite.runs")
    count_run = metrics.script_run if metrics is not None else None
    runs = asyncio.create_task(follow_run_log(args.data_dir, runs_log, on_record=count_run))

    def stop() -> None:
        notifier.stopping()
        task.cancel()  # shutdown(): cancel the run, which unwinds

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)

    async def ready() -> None:
        await agent.started.wait()  # the data dir is locked and clean; syncing starts
        notifier.ready(f"syncing from {args.core}")

    announce = asyncio.create_task(ready())
    try:
        async with notifier.watchdog():
            await task
    except asyncio.CancelledError:  # shut down by a signal
        pass
    except Exception as exc:
        if exc is not agent.worker_error:
            raise
        return 1  # the agent logged it with its traceback; a supervisor restarts us
    finally:
        runs.cancel()
        announce.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runs
        if served is not None:
            await asyncio.to_thread(served.close)
    return 0


def is_loopback_target(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _print_status(store: SatelliteStore, as_json: bool) -> None:
    info = runner.status(store)
    info.update(_sandbox_status(store.root))
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    for key in ("state", "desired_hash", "current_hash", "sync_status", "last_error"):
        print(f"{key:>15}: {info.get(key) or '-'}")
    print(f"{'tree size':>15}: {info.get('tree_size_bytes', 0)} bytes")
    print(f"{'sandbox':>15}: {info['sandbox']}")
    runs = info["last_runs"]
    assert isinstance(runs, list)
    for record in runs:
        print(f"{'run':>15}: {describe_record(record)}")


def _sandbox_status(data_dir: Path) -> dict[str, object]:
    """The host policy (or why runs are refused) and the last recorded runs."""
    try:
        host = load_host_policy(data_dir)
        sandbox = f"mandatory, {host.policy.describe()}" if host else "optional (--sandbox)"
    except SpkError as exc:
        sandbox = f"every run refused: {exc.message}"
    return {
        "sandbox": sandbox,
        "host_policy": str(host_policy_path(data_dir)),
        "last_runs": RunLog(data_dir).last(5),
    }


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "agent":
        import asyncio

        return asyncio.run(_agent(args))
    elif args.command == "run":
        script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
        sandbox = args.sandbox_policy if args.sandbox_policy is not None else None
        if sandbox is None and args.sandbox:
            sandbox = ""
        store = SatelliteStore(args.data_dir)
        return counted_run(  # counted for the agent's /metrics (satellite/run_stats.py)
            store.root,
            lambda: runner.run_script(store, args.script, script_args, sandbox=sandbox),
        )
    elif args.command == "env" and args.paths:
        editor.print_paths(SatelliteStore(args.data_dir), args.json)  # satellite/editor.py
    elif args.command == "env":
        _print_env(args.name, args.json)
    elif args.command == "status":
        _print_status(SatelliteStore(args.data_dir), args.json)
    return 0


def split_sandbox_value(argv: list[str]) -> list[str]:
    """`--sandbox=POLICY` before the script becomes `--sandbox-policy POLICY`, so that a bare
    `--sandbox script.py` does not take the script for a policy (argparse's nargs="?" would)."""
    out = list(argv)
    if "run" not in out:
        return out
    i = out.index("run") + 1
    while i < len(out) and out[i].startswith("-") and out[i] != "--":
        if out[i].startswith("--sandbox="):
            out[i : i + 1] = ["--sandbox-policy", out[i].partition("=")[2]]
            i += 2
        elif out[i] == "--data-dir":
            i += 2
        else:
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(split_sandbox_value(sys.argv[1:] if argv is None else argv))
    logging.getLogger("watchdog").setLevel(logging.INFO)  # its DEBUG logs every inotify event
    level = getattr(args, "log_level", "WARNING")
    log_format = getattr(args, "log_format", "text")
    return run_command("spk-satellite", level, lambda: _dispatch(args), log_format)


if __name__ == "__main__":
    sys.exit(main())
