"""A host policy through the real agent: `agent --policy-file` makes every run sandboxed, the
script sees none of the agent's secrets, and the run's outcome reaches the agent's log."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from satellite.host_policy import HOST_POLICY
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

PROBE = """
    import errno, json, os, socket, sys
    out = {"env": dict(os.environ)}
    import alpha
    out["alpha"] = alpha.VERSION
    for name, action in [
        ("token", lambda: open(sys.argv[1]).read()),
        ("core", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=3)),
    ]:
        try:
            action()
            out[name] = "reached"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno, str(exc))
    print(json.dumps(out))
"""


def test_agent_policy_file_sandboxes_every_run_and_logs_it(
    core: CoreProcess,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    satellites: list[SatelliteProcess],
) -> None:
    build_wheel(WheelSpec("alpha", "1.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name="alpha", version="1.0")])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    policy = tmp_path / "policy.toml"
    policy.write_text("[sandbox]\nnetwork = 'none'\ntimeout_seconds = 60\n")
    policy.chmod(0o644)
    sat = SatelliteProcess(core, "sat-sbx", tmp_path, "--policy-file", str(policy)).register()
    sat.start()
    satellites.append(sat)
    eventually(lambda: sat.current() == state.lockfile_hash, timeout=60)
    assert os.readlink(sat.data_dir / HOST_POLICY) == str(policy)
    assert "script runs on this host are sandboxed: host policy" in sat.log()

    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    secrets = {"SPK_ADMIN_TOKEN": "admin-token-value", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": "/x"}
    proc = sat.run(script, str(sat.token_file), str(core.port), env={**os.environ, **secrets})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["alpha"] == "1.0"
    assert out["token"] in ("ENOENT", "EACCES")  # the agent's token file is not in the view
    assert out["core"] == "EAFNOSUPPORT"  # no IP socket: the core's port is out of reach
    assert sat.token_file.read_text() not in json.dumps(out)
    assert not any(name.startswith(("SPK_", "GRPC_")) for name in out["env"])

    eventually(lambda: f"script run: {script}: exit 0 after" in sat.log(), timeout=20)
    status = sat.status()
    assert str(status["sandbox"]).startswith("mandatory, host policy")
    runs = status["last_runs"]
    assert isinstance(runs, list) and len(runs) == 1
    record = runs[0]
    assert record["exit_code"] == 0 and record["sandbox"].startswith("host policy")
    assert record["peak_memory_bytes"] > 0 and record["stopped_by"] is None
