"""OSV-compatible advisory endpoints (api.osv.dev, or a private mirror's), read into Findings.

    POST <url>/v1/querybatch   every (name, version) at once, ecosystem PyPI, paged by
                               next_page_token; api.osv.dev answers ids and `modified` only
    GET  <url>/v1/vulns/<id>   the full record of every id the batch named without details

A record is a finding only if its own affected data includes the shipped version (its
`versions` list or an ECOSYSTEM range), so a sloppy mirror that answers a package's every record
cannot report a fixed version. Severity: core/install/severity.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from core.install.advisories import (
    Finding,
    HttpClient,
    Query,
    SourceAnswer,
    SourceBroken,
    bounded,
    items,
    same_version,
    strings,
    summary_of,
)
from core.install.severity import osv_severity
from core.state.index_config import RegistrySettings

OSV_BATCH = 1000  # api.osv.dev's limit per querybatch
OSV_PAGES = 10  # next_page_token rounds before we call the answer incomplete


def _affects(record: dict[str, object], q: Query) -> tuple[bool, tuple[str, ...]]:
    """Whether the record says `q.version` is affected, and the versions that fix it.

    A record without affected data for this package is trusted (the server matched it); one
    that has such data and excludes the version (a fixed version, say) is not a finding.
    """
    mine = [
        a
        for a in items(record.get("affected"))
        if isinstance(a, dict)
        and isinstance(a.get("package"), dict)
        and str(a["package"].get("ecosystem", "")).lower() == "pypi"
        and canonicalize_name(str(a["package"].get("name", ""))) == q.name
    ]
    if not mine:
        return True, ()
    fixed: list[str] = []
    affected = False
    decided = False
    for entry in mine:
        versions = strings(entry.get("versions"))
        if versions:
            decided = True
            affected |= any(same_version(q.version, v) for v in versions)
        for rng in items(entry.get("ranges")):
            if not isinstance(rng, dict) or rng.get("type") != "ECOSYSTEM":
                continue
            events = [e for e in items(rng.get("events")) if isinstance(e, dict)]
            fixed += [str(e["fixed"]) for e in events if isinstance(e.get("fixed"), str)]
            verdict = _in_range(events, q.version)
            if verdict is not None:
                decided = True
                affected |= verdict
    return (affected or not decided), tuple(dict.fromkeys(fixed))


def _in_range(events: list[dict[str, object]], version: str) -> bool | None:
    """OSV ECOSYSTEM range semantics; None when a version does not parse (undecided)."""
    try:
        wanted = Version(version)
        keyed = []
        for e in events:
            kind, raw = next(iter(e.items()))
            keyed.append((Version("0") if raw == "0" else Version(str(raw)), kind))
    except (InvalidVersion, StopIteration):
        return None
    affected = False
    for at, kind in sorted(keyed, key=lambda k: k[0]):
        if kind == "introduced" and wanted >= at:
            affected = True
        elif (kind == "fixed" and wanted >= at) or (kind == "last_affected" and wanted > at):
            affected = False
    return affected


def _link(record: dict[str, object]) -> str:
    for ref in items(record.get("references")):
        if isinstance(ref, dict) and ref.get("type") in ("ADVISORY", "WEB"):
            url = ref.get("url")
            if isinstance(url, str):
                return url
    return ""


class OsvSource:
    """An OSV-compatible endpoint (api.osv.dev or a mirror's): batch query, then details."""

    def __init__(self, url: str, registry: RegistrySettings, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.description = f"osv {self.url}"
        self._registry = registry
        self._timeout = timeout

    async def query(self, queries: list[Query], answer: SourceAnswer) -> None:
        http = HttpClient(self._registry, self._timeout)
        try:
            named: dict[Query, list[object]] = {}
            for start in range(0, len(queries), OSV_BATCH):
                await self._batch(http, queries[start : start + OSV_BATCH], named)
            details = await self._details(http, named, answer)
            for q, vulns in named.items():
                for raw in vulns:
                    finding = self._finding(q, raw, details, answer)
                    if finding is not None:
                        answer.findings.append(finding)
                answer.checked.add(q)
        finally:
            await http.aclose()

    async def _batch(
        self, http: HttpClient, batch: list[Query], named: dict[Query, list[object]]
    ) -> None:
        pending = {i: "" for i in range(len(batch))}  # query index -> page token
        for _ in range(OSV_PAGES):
            order = sorted(pending)
            body = {
                "queries": [
                    {
                        "package": {"name": batch[i].name, "ecosystem": "PyPI"},
                        "version": batch[i].version,
                        **({"page_token": pending[i]} if pending[i] else {}),
                    }
                    for i in order
                ]
            }
            status, doc = await http.request("POST", f"{self.url}/v1/querybatch", body)
            if status != 200:
                raise SourceBroken(f"{self.url}/v1/querybatch answered HTTP {status}")
            results = doc.get("results") if isinstance(doc, dict) else None
            if not isinstance(results, list) or len(results) != len(order):
                raise SourceBroken(
                    f"{self.url}/v1/querybatch: expected {len(order)} results, got"
                    f" {len(results) if isinstance(results, list) else 'none'}"
                )
            pending = {}
            for i, result in zip(order, results, strict=True):
                if not isinstance(result, dict):
                    raise SourceBroken(f"{self.url}/v1/querybatch: a result is not an object")
                vulns = result.get("vulns") or []
                named.setdefault(batch[i], []).extend(vulns if isinstance(vulns, list) else [])
                token = result.get("next_page_token")
                if isinstance(token, str) and token:
                    pending[i] = token
            if not pending:
                return
        raise SourceBroken(f"{self.url}/v1/querybatch: still paging after {OSV_PAGES} rounds")

    async def _details(
        self, http: HttpClient, named: dict[Query, list[object]], answer: SourceAnswer
    ) -> dict[str, dict[str, object]]:
        """Full records for every id the batches named only by id (and `modified`)."""
        wanted = {
            raw["id"]
            for vulns in named.values()
            for raw in vulns
            if isinstance(raw, dict)
            and isinstance(raw.get("id"), str)
            and raw["id"]
            and not ({"affected", "summary", "details"} & raw.keys())
        }
        records: dict[str, dict[str, object]] = {}

        def fetch(vuln_id: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                status, doc = await http.request("GET", f"{self.url}/v1/vulns/{quote(vuln_id)}")
                if status == 404:
                    answer.warnings.append(f"{vuln_id}: named by the batch, unknown to {self.url}")
                elif status != 200:
                    raise SourceBroken(f"{self.url}/v1/vulns/{vuln_id} answered HTTP {status}")
                elif isinstance(doc, dict):
                    records[vuln_id] = doc
                else:
                    answer.warnings.append(f"{vuln_id}: a malformed record was skipped")

            return run

        await bounded(fetch(v) for v in sorted(wanted))
        return records

    def _finding(
        self,
        q: Query,
        raw: object,
        details: dict[str, dict[str, object]],
        answer: SourceAnswer,
    ) -> Finding | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
            answer.warnings.append(f"{q.name} {q.version}: a malformed advisory was skipped")
            return None
        record = details.get(raw["id"], raw)
        if record is raw and not ({"affected", "summary", "details"} & raw.keys()):
            return None  # its details were unknown (warned above)
        if record.get("withdrawn"):
            return None
        affected, fixed = _affects(record, q)
        if not affected:
            return None
        severity, said = osv_severity(record)
        return Finding(
            q.name,
            q.version,
            str(record.get("id") or raw["id"]),
            strings(record.get("aliases")),
            summary_of(record),
            fixed,
            severity,
            said,
            _link(record),
        )
