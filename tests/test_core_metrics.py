"""The core's metrics counted without a server: the audit gauges as the sampler sets them from
GetAudit / GetAuditPolicy answers, and new findings counted per server, never per process."""

from __future__ import annotations

from pathlib import Path

from core.api.metrics import CoreMetrics
from core.app.metrics_runtime import set_audit_gauges
from core.app.server import CoreConfig, CoreServer
from core.install.audit import AUDIT_FINDINGS
from core.state.audits import SEVERITIES
from shared.proto.scriptpkgs.v1 import admin_pb2 as pb

POLICY = pb.AuditPolicy(source="osv", next_run_unix=1_800_086_400)


def _value(m: CoreMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def _findings(m: CoreMetrics) -> dict[str, float]:
    return {s: _value(m, "spk_audit_findings", severity=s) for s in SEVERITIES}


def _audit(status: str, checked_at: int, **counts: int) -> pb.ReleaseAudit:
    return pb.ReleaseAudit(
        status=status,
        checked_at_unix=checked_at,
        counts=[pb.SeverityCount(severity=s, count=counts.get(s, 0)) for s in SEVERITIES],
    )


def test_the_latest_complete_audit_sets_the_gauges() -> None:
    m = CoreMetrics()
    reply = pb.GetAuditResponse(latest=_audit("ok", 1_800_000_000, high=2, unknown=1))
    set_audit_gauges(m, reply, POLICY)
    assert _findings(m) == {"unknown": 1, "low": 0, "medium": 0, "high": 2, "critical": 0}
    assert _value(m, "spk_audit_last_checked_timestamp_seconds") == 1_800_000_000
    assert _value(m, "spk_audit_incomplete") == 0
    assert _value(m, "spk_audit_next_run_timestamp_seconds") == 1_800_086_400


def test_an_incomplete_audit_keeps_the_findings_of_the_last_complete_one() -> None:
    m = CoreMetrics()
    reply = pb.GetAuditResponse(
        latest=_audit("unknown", 1_800_090_000, medium=1),  # the source went down half-way
        history=[_audit("unknown", 1_800_050_000), _audit("ok", 1_800_000_000, critical=1)],
    )
    set_audit_gauges(m, reply, POLICY)
    assert _findings(m) == {"unknown": 0, "low": 0, "medium": 1, "high": 0, "critical": 1}
    assert _value(m, "spk_audit_last_checked_timestamp_seconds") == 1_800_090_000
    assert _value(m, "spk_audit_incomplete") == 1
    # A later complete audit is the truth again: the critical advisory is gone.
    set_audit_gauges(m, pb.GetAuditResponse(latest=_audit("ok", 1_800_100_000)), POLICY)
    assert set(_findings(m).values()) == {0} and _value(m, "spk_audit_incomplete") == 0


def test_before_a_publish_or_an_audit_and_with_auditing_off() -> None:
    m = CoreMetrics()
    set_audit_gauges(m, None, pb.AuditPolicy(source="osv"))  # nothing published yet
    assert set(_findings(m).values()) == {0}
    assert _value(m, "spk_audit_incomplete") == 0
    assert _value(m, "spk_audit_last_checked_timestamp_seconds") == 0
    assert _value(m, "spk_audit_next_run_timestamp_seconds") == 0
    set_audit_gauges(m, pb.GetAuditResponse(), POLICY)  # published, its audit still running
    assert _value(m, "spk_audit_incomplete") == 1
    off = pb.GetAuditResponse(latest=_audit("unknown", 1_800_000_000))
    set_audit_gauges(m, off, pb.AuditPolicy(source="off"))  # a choice, not an outage
    assert _value(m, "spk_audit_incomplete") == 0


def test_a_severity_the_core_does_not_know_gets_no_label() -> None:
    m = CoreMetrics()
    odd = pb.ReleaseAudit(status="ok", counts=[pb.SeverityCount(severity="dire", count=3)])
    set_audit_gauges(m, pb.GetAuditResponse(latest=odd), POLICY)
    assert m.registry.get_sample_value("spk_audit_findings", {"severity": "dire"}) is None


def test_each_core_counts_its_own_new_findings(tmp_path: Path) -> None:
    one, two = (
        CoreServer(CoreConfig(tmp_path / name, metrics_listen="127.0.0.1:0"))
        for name in ("one", "two")
    )
    assert one.metrics is not None and two.metrics is not None
    before = AUDIT_FINDINGS.totals.copy()
    one.findings.add("high")
    one.findings.add("unknown", 2)
    assert _value(one.metrics, "spk_audit_new_findings_total", severity="high") == 1
    assert _value(one.metrics, "spk_audit_new_findings_total", severity="unknown") == 2
    assert _value(two.metrics, "spk_audit_new_findings_total", severity="high") == 0
    assert AUDIT_FINDINGS.totals == before  # the module's counter is no server's
    off = CoreServer(CoreConfig(tmp_path / "off"))  # metrics off: counted for the audit only
    off.findings.add("high")
    assert off.metrics is None and off.findings.totals == {"high": 1}
