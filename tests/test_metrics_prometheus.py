"""A real Prometheus server scrapes a real core and a real agent during installs and syncs; the
series are asserted through Prometheus' HTTP API, and `promtool check metrics` lints both.

The releases are audited against the fake advisory service (alpha 1.0 has a high advisory,
alpha 2.0 none) and alpha 2.0 shares a payload with 1.0, so the upgrade is served as a patch."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.advisory_server import FIXTURES, AdvisoryServer
from tests.core_process import CoreProcess, eventually
from tests.index_server import PackageIndex
from tests.prometheus_server import PROMTOOL, Prometheus, metrics_url, promtool_check, scrape
from tests.satellite_process import SatelliteProcess
from tests.wheelfactory import WheelSpec, build_wheel

HEX64 = re.compile(r"^[0-9a-f]{64}$")
PAYLOAD = os.urandom(256 * 1024)  # incompressible, the same in both versions of alpha


@pytest.fixture
def adv() -> Iterator[AdvisoryServer]:
    with AdvisoryServer(FIXTURES) as server:
        yield server


def _install(core: CoreProcess, *pins: tuple[str, str]) -> str:
    admin = core.admin()
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
    )
    state = admin.install_and_wait()
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    return str(state.lockfile_hash)


def _at_least(prom: Prometheus, promql: str, wanted: float) -> float:
    return eventually(
        lambda: (v := prom.value(promql)) is not None and v >= wanted and v, timeout=45
    )


def test_prometheus_scrapes_core_and_agent_during_install_and_sync(
    tmp_path: Path,
    package_index: PackageIndex,
    wheel_dir: Path,
    satellites: list[SatelliteProcess],
    adv: AdvisoryServer,
) -> None:
    for version in ("1.0", "2.0"):
        files = {"alpha/__init__.py": f"V = {version!r}\n".encode(), "alpha/data.bin": PAYLOAD}
        build_wheel(WheelSpec("alpha", version, files=files, requires=["beta==1.0"]), wheel_dir)
    build_wheel(WheelSpec("beta", "1.0"), wheel_dir)
    core = CoreProcess(tmp_path / "core")
    core.extra_args = ["--metrics-listen", "127.0.0.1:0"]
    core.start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        admin.SetAuditPolicy(apb.SetAuditPolicyRequest(source="osv", url=adv.url))
        first = _install(core, ("alpha", "1.0"))
        sat = SatelliteProcess(core, "sat-prom", tmp_path, "--metrics-listen", "127.0.0.1:0")
        satellites.append(sat.register().start())
        core_url = eventually(lambda: metrics_url(core.log()))
        sat_url = eventually(lambda: metrics_url(sat.log()))
        targets = {"core": core_url.split("/")[2], "satellite": sat_url.split("/")[2]}
        with Prometheus(tmp_path / "prom", targets) as prom:
            eventually(lambda: all(prom.targets_up().values()) and len(prom.targets_up()) == 2, 45)
            eventually(lambda: sat.current() == first, timeout=60)
            # The first release's audit (after its publish): alpha 1.0's high advisory.
            _at_least(prom, 'spk_audit_findings{severity="high"}', 1)
            _at_least(prom, 'spk_audit_new_findings_total{severity="high"}', 1)
            _at_least(prom, "spk_audit_last_checked_timestamp_seconds", 1.7e9)
            _at_least(prom, "spk_audit_next_run_timestamp_seconds", 1.7e9)
            assert prom.value("spk_audit_incomplete") == 0
            second = _install(core, ("alpha", "2.0"))  # scraped while it runs and syncs
            eventually(lambda: sat.current() == second, timeout=60)
            # alpha 2.0 is clean, and came as a patch from 1.0.
            eventually(lambda: prom.value('spk_audit_findings{severity="high"}') == 0, 45)
            _at_least(prom, 'spk_delta_computations_total{result="ready"}', 1)
            _at_least(prom, "spk_delta_offers_total", 1)
            _at_least(prom, "spk_delta_offered_saved_bytes_total", len(PAYLOAD) // 2)
            _at_least(prom, "spk_satellite_patches_used_total", 1)
            _at_least(prom, "spk_satellite_pulled_wheel_bytes_total", len(PAYLOAD))
            assert prom.value("spk_satellite_patch_fallbacks_total") == 0
            assert prom.value("spk_satellite_store_gc_freed_bytes_total") is not None
            try:  # a refused call is counted with the code it really ended with
                admin.AddPackage(apb.AddPackageRequest(name="alpha", version=">=1"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert sat.run(_script(tmp_path)).returncode == 0

            def q(series: str, service: str, method: str, **labels: str) -> str:
                extra = "".join(f',{k}="{v}"' for k, v in labels.items())
                svc = f"scriptpkgs.v1.{service}"
                return f'{series}{{grpc_service="{svc}",grpc_method="{method}"{extra}}}'

            admin_call = "grpc_server_handled_total", "PackageAdmin"
            _at_least(prom, q(*admin_call, "InstallNow", grpc_code="OK", grpc_type="unary"), 2)
            _at_least(prom, q(*admin_call, "AddPackage", grpc_code="INVALID_ARGUMENT"), 1)
            dist = "PackageDistribution"
            refresh = q("grpc_server_started_total", dist, "RefreshScriptPackages")
            _at_least(prom, refresh.replace("}", ',grpc_type="server_stream"}'), 1)
            downloads = q("grpc_server_handled_total", dist, "DownloadBlob", grpc_code="OK")
            _at_least(prom, downloads, 3)
            _at_least(prom, q("grpc_server_msg_sent_total", dist, "DownloadBlob"), 3)
            _at_least(prom, q("grpc_server_handling_seconds_count", dist, "GetManifest"), 2)
            _at_least(prom, 'spk_installs_total{result="ready"}', 2)
            _at_least(prom, 'spk_install_duration_seconds_count{result="ready"}', 2)
            _at_least(prom, "spk_desired_release_sequence", 2)
            _at_least(prom, "spk_desired_release_timestamp_seconds", 1.7e9)
            _at_least(prom, 'sum(spk_satellites{state="converged"})', 1)
            _at_least(prom, "sum(spk_satellites_connected)", 1)
            _at_least(prom, "spk_subscriptions_open", 1)
            _at_least(prom, 'spk_sync_reports_total{status="ready"}', 2)
            _at_least(prom, "spk_blob_downloads_total", 3)
            _at_least(prom, "spk_blob_served_bytes_total", 1)
            _at_least(prom, 'spk_storage_blobs{backend="filesystem",job="core"}', 3)
            _at_least(prom, "spk_gc_next_run_timestamp_seconds", 1.7e9)
            # The agent: its release (an info metric), pulls, stream, disk, runs.
            _at_least(prom, f'spk_satellite_release_info{{lockfile_hash="{second}"}}', 1)
            _at_least(prom, "spk_satellite_release_sequence", 2)
            _at_least(prom, "spk_satellite_converged", 1)
            _at_least(prom, "spk_satellite_stream_connected", 1)
            _at_least(prom, 'spk_satellite_syncs_total{outcome="flipped"}', 2)
            _at_least(prom, "spk_satellite_pulled_blobs_total", 3)
            _at_least(prom, "spk_satellite_pulled_bytes_total", 1)
            _at_least(prom, "spk_satellite_sync_duration_seconds_count", 2)
            _at_least(prom, "spk_satellite_last_sync_success_timestamp_seconds", 1.7e9)
            _at_least(prom, 'spk_satellite_store_bytes{area="blobs"}', 1)
            _at_least(prom, "spk_satellite_current_tree_bytes", 1)
            _at_least(prom, 'spk_satellite_script_runs_finished_total{exit_code="0"}', 1)
            # The run's record in runs.jsonl, followed by the agent (unsandboxed here).
            _at_least(prom, 'spk_satellite_script_runs_recorded_total{sandboxed="false"}', 1)
            _at_least(prom, "spk_satellite_script_run_duration_seconds_count", 1)
            _at_least(prom, "spk_satellite_script_run_peak_memory_bytes_sum", 1)
            assert prom.value('spk_satellite_script_runs_stopped_total{limit="timeout"}') == 0
            assert prom.value("spk_satellite_verification_failures_total") == 0
            _at_least(prom, 'process_resident_memory_bytes{job="core"}', 1)
            _at_least(prom, 'process_resident_memory_bytes{job="satellite"}', 1)
            # Bounded labels on the core: never a satellite name or a hash.
            series = prom.query('{job="core"}')
            values = {v for s in series for k, v in s["metric"].items() if k != "__name__"}
            assert "sat-prom" not in values and not [v for v in values if HEX64.match(v)]
            assert len(series) < 2000, len(series)
        for url in (core_url, sat_url):
            lint = promtool_check(scrape(url))
            assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        core.stop()


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "hello.py"
    path.write_text("import alpha\n")
    return path


def test_metrics_are_off_unless_asked_for(core: CoreProcess) -> None:
    assert "metrics on" not in core.log()


def test_alert_rules_pass_promtool() -> None:
    here = Path(__file__).resolve().parent
    rules = here.parent / "contrib" / "prometheus" / "spk-alerts.yml"
    assert PROMTOOL, "promtool not installed (Debian package prometheus; .ci/run installs it)"
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # The alerts fire on the series they are about, once (several core instances), labelled
    # as documented: tests/data/spk-alerts-test.yml feeds them series and expects the alerts.
    cases = here / "data" / "spk-alerts-test.yml"
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(cases)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
