"""The main job, end to end, on this machine (see scripts/demo)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import admin_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "spk-demo"
ALLOWLIST = [("six", "1.17.0"), ("python-dateutil", "2.9.0.post0")]
SCRIPT = textwrap.dedent(
    """
    import sys
    import dateutil, six
    from dateutil.parser import isoparse
    print(f"  imported python-dateutil {dateutil.__version__} and six {six.__version__}")
    print(f"  parsed: {isoparse('2026-11-27T12:00:00Z')!r}")
    try:
        import peewee  # installed next to the agent, but not on the allowlist
    except ImportError:
        print("  'import peewee' fails: not on the allowlist, as it should")
    else:
        sys.exit("  peewee was importable: isolation is broken")
    """
)


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def wait_for(what: str, check, timeout: float = 300.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


def _current_hash(sat_dir: Path) -> str | None:
    try:
        return Path(os.readlink(sat_dir / "current")).name
    except OSError:
        return None


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    token_file = DEMO / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(32))
        token_file.chmod(0o600)
    admin_token = token_file.read_text().strip()
    env = dict(os.environ, SPK_ADMIN_TOKEN=admin_token, GRPC_ENABLE_FORK_SUPPORT="false")
    bin_dir = Path(sys.executable).parent
    logs = DEMO / "logs"
    logs.mkdir(exist_ok=True)
    port_file = DEMO / "core.port"
    port_file.unlink(missing_ok=True)

    step("starting the core (data dir spk-demo/core, log spk-demo/logs/core.log)")
    core = subprocess.Popen(
        [
            bin_dir / "spk-core",
            "serve",
            "--data-dir",
            DEMO / "core",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            port_file,
        ],
        env=env,
        stdout=(logs / "core.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        port = int(
            wait_for("the core to listen", lambda: port_file.exists() and port_file.read_text(), 30)
        )
        target = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(target)
        admin = admin_pb2_grpc.PackageAdminStub(channel)
        md = (("authorization", f"Bearer {admin_token}"),)

        step(f"allowlist: {', '.join(f'{n}=={v}' for n, v in ALLOWLIST)}")
        admin.SetPackages(
            apb.SetPackagesRequest(
                packages=[apb.PackageSpec(name=n, version=v) for n, v in ALLOWLIST]
            ),
            metadata=md,
            timeout=10,
        )
        step("installing from the default package index")
        admin.InstallNow(apb.InstallNowRequest(), metadata=md, timeout=10)
        state = wait_for(
            "the install",
            lambda: (
                (
                    s := admin.GetInstallState(
                        apb.GetInstallStateRequest(), metadata=md, timeout=10
                    )
                ).status
                != apb.INSTALL_STATUS_INSTALLING
                and s
            ),
        )
        if state.status != apb.INSTALL_STATUS_READY:
            raise SystemExit(f"install failed: {state.error}")
        manifest = admin.GetManifest(apb.AdminGetManifestRequest(), metadata=md, timeout=10)
        print(
            f"  lockfile {state.lockfile_hash[:16]}…:"
            f" {len(manifest.entries)} wheels, {state.total_bytes} bytes"
        )
        for e in manifest.entries:
            print(
                f"    {e.filename}  sha256 {e.sha256[:12]}…"
                f"  {'requested' if e.requested else 'dependency'}"
            )

        sat_dir = DEMO / "satellite"
        sat_token = DEMO / "satellite.token"
        if not sat_token.exists():
            step("creating satellite identity 'demo-host'")
            with contextlib.suppress(grpc.RpcError):
                admin.RevokeSatellite(
                    apb.RevokeSatelliteRequest(name="demo-host"), metadata=md, timeout=10
                )
            reply = admin.CreateSatellite(
                apb.CreateSatelliteRequest(name="demo-host"), metadata=md, timeout=10
            )
            sat_token.write_text(reply.token)
            sat_token.chmod(0o600)
        key_file = DEMO / "core-signing-key.pem"
        key_file.write_text(
            subprocess.run(
                [bin_dir / "spk-core", "signing-key", "export", "--data-dir", DEMO / "core"],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
        )
        # What this run has to do: a data dir left by an earlier run may already hold the tree.
        before = _current_hash(sat_dir)
        started_at = time.time()
        step(
            "starting the satellite agent"
            " (data dir spk-demo/satellite, log spk-demo/logs/satellite.log)"
        )
        agent = subprocess.Popen(
            [
                bin_dir / "spk-satellite",
                "agent",
                "--core",
                target,
                "--token-file",
                sat_token,
                "--signing-key",
                key_file,
                "--data-dir",
                sat_dir,
            ],
            env=env,
            stdout=(logs / "satellite.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

        def converged() -> object:
            sats = admin.ListSatellites(
                apb.ListSatellitesRequest(), metadata=md, timeout=10
            ).satellites
            sat = next((s for s in sats if s.name == "demo-host"), None)
            # Only what this agent reported counts: the row keeps an earlier run's status.
            if sat is None or not sat.connected or sat.last_seen_unix < int(started_at):
                return None
            if sat.status == "error":
                raise SystemExit(f"satellite reported an error: {sat.error}")
            return (
                sat if sat.current_hash == state.lockfile_hash and sat.status == "ready" else None
            )

        sat = wait_for("the satellite to converge", converged, 120)
        if before == state.lockfile_hash:
            print(
                f"  satellite demo-host already had {sat.current_hash[:16]}… from an earlier"
                " run: nothing to pull this time"
            )
        else:
            print(
                f"  satellite demo-host is at {sat.current_hash[:16]}…"
                f" (this sync pulled {sat.last_pull_blobs} blobs, {sat.last_pull_bytes} bytes"
                f" in {sat.last_duration_ms} ms)"
            )

        script = DEMO / "hello.py"
        script.write_text(SCRIPT)
        step("running a user script on the satellite: spk-satellite run hello.py")
        run = subprocess.run(
            [bin_dir / "spk-satellite", "run", "--data-dir", sat_dir, script], env=env
        )
        if run.returncode != 0:
            raise SystemExit(f"the script failed with exit code {run.returncode}")
        status = subprocess.run(
            [bin_dir / "spk-satellite", "status", "--data-dir", sat_dir, "--json"],
            capture_output=True,
            text=True,
            env=env,
        )
        if status.returncode == 0:
            info = json.loads(status.stdout)
            print(
                f"  satellite status: {info.get('state')},"
                f" tree {info.get('tree_size_bytes', 0)} bytes"
            )
        step("done: the core and the satellite agree, and the script saw exactly the allowlist")
        return 0
    finally:
        for proc in (agent, core):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
