"""Release audits against the real core, a real package index and the fake advisory service.

Every publish is audited in the background (all environments), on demand and on a schedule;
history is kept, a new or worse advisory is logged once; a blocking policy refuses a release
naming packages and advisory ids and keeps the previous one; a down or hung source never
blocks or slows an install beyond the policy's timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from shared.proto.scriptpkgs.v1 import common_pb2 as cpb
from tests.advisory_server import FIXTURES, AdvisoryServer, osv_record
from tests.core_process import ADMIN_TOKEN, AdminClient, CoreProcess, eventually
from tests.index_server import PackageIndex, free_port
from tests.wheelfactory import WheelSpec, build_wheel


@pytest.fixture
def adv() -> Iterator[AdvisoryServer]:
    with AdvisoryServer(FIXTURES) as server:
        yield server


@pytest.fixture
def core(
    core: CoreProcess, package_index: PackageIndex, adv: AdvisoryServer, wheel_dir: Path
) -> CoreProcess:
    """The conftest core on the test index, auditing against the fake OSV service."""
    for name, version in [("alpha", "1.0"), ("alpha", "1.1"), ("beta", "2.0"), ("gamma", "3.0")]:
        build_wheel(WheelSpec(name, version), wheel_dir)
    build_wheel(WheelSpec("delta", "1.0"), wheel_dir)
    admin = core.admin()
    admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
    admin.SetAuditPolicy(apb.SetAuditPolicyRequest(source="osv", url=adv.url))
    return core


def _install(admin: AdminClient, *pins: tuple[str, str]) -> apb.InstallState:
    admin.SetPackages(
        apb.SetPackagesRequest(packages=[apb.PackageSpec(name=n, version=v) for n, v in pins])
    )
    state: apb.InstallState = admin.install_and_wait()
    return state


def _latest(admin: AdminClient, trigger: str, count: int = 1) -> apb.GetAuditResponse:
    """Once the release has `count` audits and the newest has `trigger`."""

    def check() -> apb.GetAuditResponse | None:
        got: apb.GetAuditResponse = admin.GetAudit(apb.GetAuditRequest(history=50))
        ready = got.HasField("latest") and got.latest.trigger == trigger
        return got if ready and 1 + len(got.history) >= count else None

    return eventually(check, timeout=30, interval=0.2)


def _ids(audit: apb.ReleaseAudit) -> dict[str, apb.Advisory]:
    return {a.package: a for a in audit.advisories}


def _cli(core: CoreProcess, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_")}
    return subprocess.run(
        [sys.executable, "-m", "core.app.cli", "admin", "--core", core.target,
         "--token-file", str(token_file), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_every_publish_is_audited_then_on_demand_with_history_and_new_findings_logged_once(
    core: CoreProcess, adv: AdvisoryServer, tmp_path: Path
) -> None:
    admin = core.admin()
    admin.AddEnvironment(
        apb.AddEnvironmentRequest(
            environment=cpb.Environment(
                name="py312-arm",
                target=cpb.TargetEnvironment(
                    python_version="3.12", platform="manylinux_2_28_aarch64"
                ),
            )
        )
    )
    state = _install(admin, ("alpha", "1.0"), ("beta", "2.0"))
    assert state.status == apb.INSTALL_STATUS_READY, state.error

    first = _latest(admin, "publish").latest
    assert first.status == "ok", first.reason
    assert first.release_sequence == state.release_sequence
    assert first.source == f"osv {adv.url}"
    found = _ids(first)
    assert set(found) == {"alpha", "beta"}
    alpha = found["alpha"]
    assert (alpha.id, alpha.severity) == ("PYSEC-2026-11", "high")
    assert set(alpha.aliases) == {"GHSA-aaaa-bbbb-cccc", "CVE-2026-1111"}
    assert list(alpha.fixed_in) == ["1.1"]
    assert set(alpha.environments) == {"default", "py312-arm"}  # every environment's entries
    assert {c.severity: c.count for c in first.counts}["high"] == 1
    assert set(first.new_advisories) == {"PYSEC-2026-11", "GHSA-dddd-eeee-ffff"}

    again = admin.AuditRelease(apb.AuditReleaseRequest())
    assert again.trigger == "on-demand" and again.status == "ok"
    assert list(again.new_advisories) == []  # the same as last time: not new

    # A new advisory is published upstream: the next audit finds it, logs it once.
    adv.records["GHSA-zzzz-yyyy-xxxx"] = osv_record(
        "GHSA-zzzz-yyyy-xxxx",
        "beta",
        ["2.0"],
        summary="beta runs code from a cookie",
        cvss="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
    )
    third = admin.AuditRelease(apb.AuditReleaseRequest(lockfile_hash=state.lockfile_hash))
    assert list(third.new_advisories) == ["GHSA-zzzz-yyyy-xxxx"]
    assert {a.id: a.severity for a in third.advisories}["GHSA-zzzz-yyyy-xxxx"] == "critical"
    assert {c.severity: c.count for c in third.counts}["critical"] == 1
    admin.AuditRelease(apb.AuditReleaseRequest())
    log = core.log()
    assert log.count("advisory GHSA-zzzz-yyyy-xxxx") == 1
    assert log.count("advisory PYSEC-2026-11") == 1

    history = admin.GetAudit(apb.GetAuditRequest(history=10))
    assert [a.trigger for a in [history.latest, *history.history]] == [
        "on-demand", "on-demand", "on-demand", "publish",
    ]  # fmt: skip

    shown = _cli(core, tmp_path, "audit", "--last")
    assert shown.returncode == 0, shown.stderr
    assert "PYSEC-2026-11 (GHSA-aaaa-bbbb-cccc, CVE-2026-1111)" in shown.stdout
    assert "fixed in 1.1" in shown.stdout
    assert _cli(core, tmp_path, "audit", state.lockfile_hash).returncode == 0

    unknown = "ab" * 32
    with pytest.raises(grpc.RpcError) as err:
        admin.GetAudit(apb.GetAuditRequest(lockfile_hash=unknown))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_blocking_policy_refuses_a_release_naming_packages_and_ids_and_keeps_the_previous(
    core: CoreProcess, tmp_path: Path
) -> None:
    admin = core.admin()
    first = _install(admin, ("delta", "1.0"))
    assert first.status == apb.INSTALL_STATUS_READY, first.error
    assert _cli(core, tmp_path, "audit-policy", "set", "--block", "high").returncode == 0

    blocked = _install(admin, ("alpha", "1.0"), ("delta", "1.0"))
    assert blocked.status == apb.INSTALL_STATUS_ERROR
    assert "audit policy blocks this release" in blocked.error
    assert "alpha 1.0: PYSEC-2026-11 (GHSA-aaaa-bbbb-cccc, CVE-2026-1111) high" in blocked.error
    assert (blocked.lockfile_hash, blocked.release_sequence) == (
        first.lockfile_hash,
        first.release_sequence,
    )  # the previous release stays desired
    assert len(admin.ListReleases().releases) == 1

    # No severity given (gamma's record): for policy it counts as critical unless said otherwise.
    unknown = _install(admin, ("gamma", "3.0"))
    assert unknown.status == apb.INSTALL_STATUS_ERROR
    assert "gamma 3.0: PYSEC-2026-33 unknown" in unknown.error
    assert "unknown severity counts as critical" in unknown.error
    admin.SetAuditPolicy(apb.SetAuditPolicyRequest(unknown_as="medium"))
    assert _install(admin, ("gamma", "3.0")).status == apb.INSTALL_STATUS_READY

    # Accepted with a reason (by an alias): published; the audit shows it, ignored.
    ignore = _cli(
        core, tmp_path, "audit-policy", "ignore", "CVE-2026-1111", "--reason", "no templates"
    )
    assert ignore.returncode == 0, ignore.stderr
    assert "ignore CVE-2026-1111: no templates" in ignore.stdout
    accepted = _install(admin, ("alpha", "1.0"), ("delta", "1.0"))
    assert accepted.status == apb.INSTALL_STATUS_READY, accepted.error
    audit = _latest(admin, "publish").latest
    alpha = _ids(audit)["alpha"]
    assert alpha.ignored and alpha.ignore_reason == "no templates"
    assert {c.severity: c.count for c in audit.counts}["high"] == 0

    assert _cli(core, tmp_path, "audit-policy", "unignore", "CVE-2026-1111").returncode == 0
    fixed = _install(admin, ("alpha", "1.1"), ("delta", "1.0"))
    assert fixed.status == apb.INSTALL_STATUS_READY, fixed.error

    # A rollback publishes a release too: it is audited, and never gated (the emergency exit).
    rolled = admin.Rollback(apb.RollbackRequest(release_sequence=accepted.release_sequence))
    assert rolled.status == apb.INSTALL_STATUS_READY
    audit = _latest(admin, "publish").latest
    assert audit.release_sequence == rolled.release_sequence
    assert [a.id for a in audit.advisories if not a.ignored] == ["PYSEC-2026-11"]
    with pytest.raises(grpc.RpcError) as err:
        admin.SetAuditPolicy(
            apb.SetAuditPolicyRequest(
                ignores=[apb.AuditIgnore(advisory_id="GHSA-1")], replace_ignores=True
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audit.ignores[0].reason" in (err.value.details() or "")


def test_a_hung_or_unreachable_source_never_blocks_nor_slows_an_install(
    core: CoreProcess, adv: AdvisoryServer
) -> None:
    admin = core.admin()
    admin.SetAuditPolicy(apb.SetAuditPolicyRequest(block_severity="low", timeout_seconds=2))
    adv.delay = 60.0
    started = time.monotonic()
    state = _install(admin, ("alpha", "1.0"))
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    assert time.monotonic() - started < 30  # the resolver, downloads, and at most 2 s of audit
    audit = _latest(admin, "publish").latest
    assert audit.status == "unknown"
    assert "did not finish within 2 s" in audit.reason or "did not answer in time" in audit.reason

    adv.delay = 0.0
    closed = f"http://127.0.0.1:{free_port()}"
    admin.SetAuditPolicy(apb.SetAuditPolicyRequest(url=closed))
    state = _install(admin, ("alpha", "1.0"), ("delta", "1.0"))
    assert state.status == apb.INSTALL_STATUS_READY, state.error
    audit = _latest(admin, "publish").latest  # release 2's own audit
    assert audit.status == "unknown" and "unreachable" in audit.reason


def test_the_schedule_audits_the_desired_release(
    package_index: PackageIndex, adv: AdvisoryServer, wheel_dir: Path, tmp_path: Path
) -> None:
    build_wheel(WheelSpec("beta", "2.0"), wheel_dir)
    core = CoreProcess(tmp_path / "scheduled")
    core.extra_args = ["--audit-interval-hours", "0.0005"]  # 1.8 s
    core.start()
    try:
        admin = core.admin()
        admin.SetRegistryConfig(apb.SetRegistryConfigRequest(index_url=package_index.url))
        admin.SetAuditPolicy(apb.SetAuditPolicyRequest(source="osv", url=adv.url))
        assert _install(admin, ("beta", "2.0")).status == apb.INSTALL_STATUS_READY
        policy = admin.GetAuditPolicy()
        assert policy.interval_seconds == 2 and policy.next_run_unix > 0
        got = _latest(admin, "schedule", count=2)
        assert got.latest.status == "ok"
        assert [a.id for a in got.latest.advisories] == ["GHSA-dddd-eeee-ffff"]
    finally:
        core.stop()
