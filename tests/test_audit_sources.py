"""Advisory sources and the audit itself, against the fake advisory service on loopback.

Both formats (the index's JSON API and OSV) serve the same fixture records
(tests/advisory_server.py): aliases that must merge, a fixed version, malformed records, a 500,
a hung source, and credentials that go only to the index's origin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from core.install.audit import Auditor, FindingsCounter, audit_manifests, json_api_base
from core.install.findings import block_message, blocking, new_or_worse
from core.install.severity import cvss3_base_score, osv_severity
from core.state.audits import (
    Advisory,
    AuditIgnore,
    AuditPolicy,
    AuditResult,
    ReleaseAudit,
    validate_policy,
)
from core.state.index_config import RegistrySettings
from shared.errors import InvalidArgument
from shared.manifest import Manifest, ManifestEntry, TargetEnvironment
from tests.advisory_server import FIXTURES, AdvisoryServer, headers_to

ENV = TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_17_x86_64")


def _manifest(*pins: tuple[str, str]) -> Manifest:
    entries = [
        ManifestEntry(n, v, f"{n}-{v}-py3-none-any.whl", f"{i:064x}", 100, True)
        for i, (n, v) in enumerate(pins, 1)
    ]
    return Manifest.build(entries, ENV)


RELEASE = [("default", _manifest(("alpha", "1.0"), ("beta", "2.0"), ("gamma", "3.0")))]


@pytest.fixture
def adv() -> Iterator[AdvisoryServer]:
    with AdvisoryServer(FIXTURES) as server:
        yield server


def _json(adv: AdvisoryServer, **kw: object) -> AuditPolicy:
    return AuditPolicy(source="json", url=f"{adv.url}/pypi", **kw)  # type: ignore[arg-type]


def _osv(adv: AdvisoryServer, **kw: object) -> AuditPolicy:
    return AuditPolicy(source="osv", url=adv.url, **kw)  # type: ignore[arg-type]


REGISTRY = RegistrySettings(index_url="http://127.0.0.1:9/simple")


def _by_package(result: AuditResult) -> dict[str, list[Advisory]]:
    found: dict[str, list[Advisory]] = {}
    for a in result.advisories:
        found.setdefault(a.package, []).append(a)
    return found


# --------------------------------------------------------------------------- severity


@pytest.mark.parametrize(
    ("vector", "score"),
    [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1),
        ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", 5.5),
        ("CVSS:3.0/AV:N/AC:H/PR:N/UI:N/S:U/C:L/I:N/A:N", 3.7),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0),
        ("CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N", None),
        ("not a vector", None),
    ],
)
def test_cvss3_base_scores_match_the_specification(vector: str, score: float | None) -> None:
    assert cvss3_base_score(vector) == score


def test_osv_severity_takes_the_highest_readable_claim() -> None:
    assert osv_severity({"database_specific": {"severity": "MODERATE"}}) == ("medium", "MODERATE")
    vector = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"
    got = osv_severity(
        {
            "database_specific": {"severity": "LOW"},
            "severity": [{"type": "CVSS_V3", "score": vector}],
        }
    )
    assert got == ("critical", f"{vector} (base 9.8)")
    v4 = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"
    assert osv_severity({"severity": [{"type": "CVSS_V4", "score": v4}]}) == ("unknown", "")
    assert osv_severity({}) == ("unknown", "")


# --------------------------------------------------------------------------- policy and pure parts


def test_policy_validation_names_the_field() -> None:
    assert validate_policy(AuditPolicy(block_severity="HIGH")).block_severity == "high"
    assert validate_policy(AuditPolicy(block_severity="none")).block_severity == ""
    cases = [
        (AuditPolicy(source="nvd"), "audit.source"),
        (AuditPolicy(source="osv"), "audit.url"),
        (AuditPolicy(url="http://advisories.example.com"), "plain http"),
        (AuditPolicy(url="https://u:p@advisories.example.com"), "credentials"),
        (AuditPolicy(block_severity="severe"), "audit.block_severity"),
        (AuditPolicy(unknown_as="none"), "audit.unknown_as"),
        (AuditPolicy(timeout_seconds=0), "audit.timeout_seconds"),
        (AuditPolicy(ignores=(AuditIgnore("GHSA-x", " "),)), r"audit.ignores\[0\].reason"),
        (AuditPolicy(ignores=(AuditIgnore("two ids", "r"),)), r"audit.ignores\[0\].advisory_id"),
    ]
    for policy, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            validate_policy(policy)


def test_json_api_base_is_derived_from_a_simple_index() -> None:
    assert json_api_base("https://pypi.org/simple") == "https://pypi.org/pypi"
    assert json_api_base("https://pypi.org/simple/") == "https://pypi.org/pypi"
    assert json_api_base("https://mirror.example/pypi-proxy/simple/") == (
        "https://mirror.example/pypi-proxy/pypi"
    )
    assert json_api_base("https://devpi.example/root/pypi/+simple/") is None


def _advisory(aid: str, severity: str, *aliases: str, package: str = "alpha") -> Advisory:
    return Advisory(aid, aliases, "", package, "1.0", (), severity)


def test_new_or_worse_compares_with_the_previous_audit_by_any_id() -> None:
    before = AuditResult("ok", "", "osv x", 1, 1, (_advisory("GHSA-1", "medium", "CVE-1"),))
    previous = ReleaseAudit(1, 1, "publish", before)
    same_by_alias = AuditResult("ok", "", "osv x", 2, 1, (_advisory("PYSEC-1", "medium", "CVE-1"),))
    assert new_or_worse(same_by_alias, previous) == []
    worse = AuditResult("ok", "", "osv x", 2, 1, (_advisory("GHSA-1", "high"),))
    assert [a.id for a in new_or_worse(worse, previous)] == ["GHSA-1"]
    other_package = AuditResult("ok", "", "osv x", 2, 1, (_advisory("GHSA-1", "low", package="b"),))
    assert [a.package for a in new_or_worse(other_package, previous)] == ["b"]
    assert len(new_or_worse(before, None)) == 1


def test_policy_blocks_at_or_above_and_ranks_unknown_as_configured() -> None:
    found = (
        _advisory("GHSA-1", "high"),
        _advisory("PYSEC-2", "unknown"),
        _advisory("GHSA-3", "low"),
    )
    result = AuditResult("ok", "", "osv x", 1, 1, found)
    policy = AuditPolicy(block_severity="high")
    assert [a.id for a in blocking(result, policy)] == ["GHSA-1", "PYSEC-2"]  # unknown: critical
    lenient = AuditPolicy(block_severity="high", unknown_as="medium")
    assert [a.id for a in blocking(result, lenient)] == ["GHSA-1"]
    assert blocking(result, AuditPolicy()) == []  # default: report only
    unknown = AuditResult("unknown", "down", "osv x", 1, 0, found)
    assert blocking(unknown, policy) == []  # a source that is down never blocks
    message = block_message(blocking(result, policy), policy)
    assert "alpha 1.0: GHSA-1 high" in message and "PYSEC-2" in message
    assert "previous release stays" in message


# --------------------------------------------------------------------------- both formats


@pytest.mark.parametrize("fmt", ["json", "osv"])
async def test_aliases_merge_into_one_advisory_per_vulnerability(
    adv: AdvisoryServer, fmt: str
) -> None:
    policy = _json(adv) if fmt == "json" else _osv(adv)
    result = await audit_manifests(RELEASE, policy, REGISTRY)
    assert result.status == "ok", result.reason
    assert result.packages_checked == 3
    found = _by_package(result)
    (alpha,) = found["alpha"]  # PYSEC-2026-11 and GHSA-aaaa-bbbb-cccc are one vulnerability
    assert alpha.id == "PYSEC-2026-11"
    assert set(alpha.aliases) == {"GHSA-aaaa-bbbb-cccc", "CVE-2026-1111"}
    assert alpha.fixed_in == ("1.1",)
    assert alpha.environments == ("default",)
    assert alpha.summary
    (beta,) = found["beta"]
    (gamma,) = found["gamma"]
    if fmt == "osv":  # OSV carries severity; the JSON API never does
        assert (alpha.severity, alpha.severity_source) == ("high", "HIGH")
        assert beta.severity == "medium"
        assert gamma.severity == "unknown"
        assert result.counts() == {"unknown": 1, "low": 0, "medium": 1, "high": 1, "critical": 0}
        # The batch named ids only: each record was fetched once by id.
        assert sorted(p for p in adv.paths() if p.startswith("/v1/vulns/")) == sorted(
            f"/v1/vulns/{r['id']}" for r in FIXTURES
        )
    else:
        assert {alpha.severity, beta.severity, gamma.severity} == {"unknown"}
        assert result.counts()["unknown"] == 3


@pytest.mark.parametrize("fmt", ["json", "osv"])
async def test_a_fixed_version_has_no_advisory_even_from_a_sloppy_source(
    adv: AdvisoryServer, fmt: str
) -> None:
    adv.sloppy = True  # the source answers alpha's records for alpha 1.1 too
    policy = _json(adv) if fmt == "json" else _osv(adv)
    result = await audit_manifests([("default", _manifest(("alpha", "1.1")))], policy, REGISTRY)
    assert result.status == "ok", result.reason
    assert result.advisories == ()
    assert result.packages_checked == 1


@pytest.mark.parametrize("fmt", ["json", "osv"])
async def test_malformed_records_are_skipped_with_a_warning(adv: AdvisoryServer, fmt: str) -> None:
    adv.malformed["beta"] = [42, {"aliases": ["CVE-0"]}, {"id": ""}]
    if fmt == "osv":
        adv.full_batch = True
    policy = _json(adv) if fmt == "json" else _osv(adv)
    result = await audit_manifests(RELEASE, policy, REGISTRY)
    assert result.status == "ok", result.reason
    assert [a.id for a in _by_package(result)["beta"]] == ["GHSA-dddd-eeee-ffff"]
    assert any("beta 2.0: a malformed advisory was skipped" in w for w in result.warnings)


@pytest.mark.parametrize(("fmt", "broken"), [("json", "beta"), ("osv", "querybatch")])
async def test_a_500_makes_the_audit_unknown_with_the_reason(
    adv: AdvisoryServer, fmt: str, broken: str
) -> None:
    adv.status[broken] = 500
    policy = _json(adv) if fmt == "json" else _osv(adv)
    result = await audit_manifests(RELEASE, policy, REGISTRY)
    assert result.status == "unknown"
    assert "HTTP 500" in result.reason
    if fmt == "json":
        assert "beta 2.0" in result.reason


async def test_osv_details_failing_makes_the_audit_unknown(adv: AdvisoryServer) -> None:
    adv.status["vulns"] = 503
    result = await audit_manifests(RELEASE, _osv(adv), REGISTRY)
    assert result.status == "unknown" and "HTTP 503" in result.reason


@pytest.mark.parametrize("fmt", ["json", "osv"])
async def test_a_hung_source_is_cut_at_the_policy_timeout(adv: AdvisoryServer, fmt: str) -> None:
    adv.delay = 30.0
    policy = (_json if fmt == "json" else _osv)(adv, timeout_seconds=1)
    started = time.monotonic()
    result = await audit_manifests(RELEASE, policy, REGISTRY)
    assert time.monotonic() - started < 5
    assert result.status == "unknown"
    assert "did not finish within 1 s" in result.reason or "did not answer in time" in result.reason


async def test_an_index_without_advisories_is_unknown_not_clean(adv: AdvisoryServer) -> None:
    adv.json_without_field = True
    result = await audit_manifests(RELEASE, _json(adv), REGISTRY)
    assert result.status == "unknown" and "no `vulnerabilities`" in result.reason
    nothing_known = await audit_manifests(
        [("default", _manifest(("delta", "1.0")))], _json(adv), REGISTRY
    )
    assert (
        nothing_known.status == "unknown" and "knows none of the 1 packages" in nothing_known.reason
    )


async def test_ignored_advisories_are_kept_but_not_counted(adv: AdvisoryServer) -> None:
    policy = _osv(adv, ignores=(AuditIgnore("cve-2026-1111", "not reachable from our code"),))
    result = await audit_manifests(RELEASE, policy, REGISTRY)
    (alpha,) = _by_package(result)["alpha"]
    assert alpha.ignored_reason == "not reachable from our code"
    assert result.counts()["high"] == 0
    assert blocking(result, AuditPolicy(block_severity="low", ignores=policy.ignores)) != []
    assert all(
        a.package != "alpha"
        for a in blocking(result, AuditPolicy(block_severity="low", ignores=policy.ignores))
    )


async def test_credentials_go_to_the_index_origin_only(adv: AdvisoryServer) -> None:
    token = "s3cret-index-token"
    # The JSON API on the index's origin gets the index token, as the resolver's requests do.
    on_index = RegistrySettings(index_url=f"{adv.url}/simple", token=token)
    result = await audit_manifests(RELEASE, AuditPolicy(source="json"), on_index)
    assert result.status == "ok", result.reason
    assert all("Authorization" in h for h in headers_to(adv, "/pypi/"))
    # An OSV endpoint elsewhere never does.
    adv.requests.clear()
    elsewhere = RegistrySettings(index_url="http://localhost:9/simple", token=token)
    result = await audit_manifests(RELEASE, _osv(adv), elsewhere)
    assert result.status == "ok", result.reason
    assert adv.requests and all("Authorization" not in h for _, _, h in adv.requests)


async def test_off_and_underivable_sources_are_unknown_without_a_request(
    adv: AdvisoryServer,
) -> None:
    off = await audit_manifests(RELEASE, AuditPolicy(source="off"), REGISTRY)
    assert off.status == "unknown" and "auditing is off" in off.reason
    devpi = RegistrySettings(index_url="https://devpi.example/root/pypi/+simple/")
    result = await audit_manifests(RELEASE, AuditPolicy(source="json"), devpi)
    assert result.status == "unknown" and "no JSON API can be derived" in result.reason
    assert adv.requests == []


async def test_a_zero_interval_turns_the_schedule_off() -> None:
    auditor = Auditor(None, None, interval_seconds=0)  # type: ignore[arg-type]
    await asyncio.wait_for(auditor.run_schedule(), 1)  # returns at once, touching nothing
    assert auditor.next_run_at(None) is None


def test_the_findings_counter_feeds_metrics_hooks_and_survives_a_broken_one() -> None:
    counter = FindingsCounter()
    seen: list[tuple[str, int]] = []

    def broken(severity: str, count: int) -> None:
        raise RuntimeError("exporter down")

    counter.subscribe(broken)
    counter.subscribe(lambda severity, count: seen.append((severity, count)))
    counter.add("high")
    counter.add("unknown", 2)
    assert seen == [("high", 1), ("unknown", 2)]
    assert counter.totals == {"high": 1, "unknown": 2}
