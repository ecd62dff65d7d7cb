"""Advisory sources: the index's JSON API and OSV-compatible endpoints, read into Findings.

    JsonApiSource   GET <base>/<name>/<version>/json, field `vulnerabilities` (what PyPI serves
                    and pip-audit's PyPI service reads); no severity in it, so `unknown`
    OsvSource       POST <url>/v1/querybatch (ecosystem PyPI), then GET <url>/v1/vulns/<id> for
                    every record the batch names without its details (api.osv.dev does that)

Both fill a SourceAnswer in place, so whatever was answered before a timeout is kept. A source
that breaks (an HTTP error, a body that is not the documented JSON) raises SourceBroken, which
the auditor turns into an audit of status `unknown`; a single malformed record is skipped with
a warning. Credentials follow the resolver's rules: the registry's token goes only to an index
origin (scheme, host and port: core/install/index_client.py `basic_auth_header`), never along
a redirect to another origin; plain http is accepted only for loopback (core/state/audits.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, urljoin, urlsplit

import httpx
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from core.install.index_client import basic_auth_header
from core.install.severity import osv_severity
from core.state.index_config import RegistrySettings

MAX_BODY = 16 * 1024 * 1024  # PyPI's biggest release JSON is a few MiB
MAX_REDIRECTS = 3
CONCURRENCY = 8
OSV_BATCH = 1000  # api.osv.dev's limit per querybatch
OSV_PAGES = 10  # next_page_token rounds before we call the answer incomplete
MAX_SUMMARY = 300


@dataclass(frozen=True)
class Query:
    name: str  # PEP 503
    version: str


@dataclass(frozen=True)
class Finding:
    """One advisory record for one package version, as a source gave it (not merged yet)."""

    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    summary: str
    fixed_in: tuple[str, ...]
    severity: str = "unknown"
    severity_source: str = ""
    link: str = ""


@dataclass
class SourceAnswer:
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: set[Query] = field(default_factory=set)  # queries the source answered


class SourceBroken(Exception):
    """The source did not answer as documented; the audit is `unknown` with this reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdvisorySource(Protocol):
    description: str  # "json https://pypi.org/pypi": shown with every audit

    async def query(self, queries: list[Query], answer: SourceAnswer) -> None: ...


def _where(url: str) -> str:
    return urlsplit(url)._replace(query="", fragment="").geturl()


class _Http:
    """One pooled client per audit: credentials only to index origins, bounded bodies."""

    def __init__(self, registry: RegistrySettings, timeout: float) -> None:
        self._registry = registry
        limits = httpx.Limits(max_connections=CONCURRENCY)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), limits=limits, follow_redirects=False
        )

    async def request(self, method: str, url: str, body: object = None) -> tuple[int, object]:
        """(status, parsed JSON or None for a non-200); SourceBroken on transport errors."""
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": "application/json", "User-Agent": "spk-core"}
            if auth := basic_auth_header(url, self._registry):
                headers["Authorization"] = auth
            try:
                async with self.client.stream(method, url, headers=headers, json=body) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise SourceBroken(f"{_where(url)}: refusing a non-http(s) redirect")
                        continue
                    if resp.status_code != 200:
                        return resp.status_code, None
                    data = bytearray()
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_BODY:
                            raise SourceBroken(f"{_where(url)}: more than {MAX_BODY} bytes")
            except httpx.TimeoutException:
                raise SourceBroken(f"{_where(url)} did not answer in time") from None
            except httpx.HTTPError as exc:
                raise SourceBroken(f"{_where(url)} is unreachable: {exc}") from None
            try:
                return 200, json.loads(bytes(data))
            except ValueError:
                raise SourceBroken(f"{_where(url)} answered something that is not JSON") from None
        raise SourceBroken(f"{_where(url)}: more than {MAX_REDIRECTS} redirects")

    async def aclose(self) -> None:
        await self.client.aclose()


async def _bounded(jobs: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Run the jobs CONCURRENCY at a time; the first failure cancels the rest and is raised."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(one(job))
    except ExceptionGroup as failures:
        broken = [e for e in failures.exceptions if isinstance(e, SourceBroken)]
        if broken:
            raise broken[0] from None
        raise


def items(value: object) -> list[object]:
    """A JSON list, or [] for anything else (a source's records are never trusted for shape)."""
    return value if isinstance(value, list) else []


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str) and v) if isinstance(value, list) else ()


def _summary(record: dict[str, object]) -> str:
    for key in ("summary", "details"):
        text = record.get(key)
        if isinstance(text, str) and text.strip():
            line = text.strip().splitlines()[0]
            return line if len(line) <= MAX_SUMMARY else line[: MAX_SUMMARY - 1] + "…"
    return ""


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


# --------------------------------------------------------------------------- the index's JSON API


class JsonApiSource:
    """The index's JSON API: one request per package version (PyPI: https://pypi.org/pypi)."""

    def __init__(self, base: str, registry: RegistrySettings, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.description = f"json {self.base}"
        self._registry = registry
        self._timeout = timeout

    async def query(self, queries: list[Query], answer: SourceAnswer) -> None:
        http = _Http(self._registry, self._timeout)
        try:
            await _bounded(self._one(http, q, answer) for q in queries)
        finally:
            await http.aclose()
        if queries and not answer.checked:
            raise SourceBroken(
                f"{self.base} knows none of the {len(queries)} packages (HTTP 404 for each):"
                " does it serve the JSON API? Set the audit source (SetAuditPolicy url, or osv)"
            )

    def _one(self, http: _Http, q: Query, answer: SourceAnswer) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            url = f"{self.base}/{quote(q.name)}/{quote(q.version)}/json"
            status, doc = await http.request("GET", url)
            if status == 404:
                answer.warnings.append(f"{q.name} {q.version}: not on {self.base}; not checked")
                return
            if status != 200:
                raise SourceBroken(f"{self.base} answered HTTP {status} for {q.name} {q.version}")
            vulns = doc.get("vulnerabilities") if isinstance(doc, dict) else None
            if not isinstance(vulns, list):
                raise SourceBroken(
                    f"{self.base}: the JSON for {q.name} {q.version} has no `vulnerabilities`"
                    " list; this index does not publish advisories (use an osv source)"
                )
            for raw in vulns:
                finding = self._finding(q, raw, answer)
                if finding is not None:
                    answer.findings.append(finding)
            answer.checked.add(q)

        return run

    def _finding(self, q: Query, raw: object, answer: SourceAnswer) -> Finding | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
            answer.warnings.append(f"{q.name} {q.version}: a malformed advisory was skipped")
            return None
        if raw.get("withdrawn"):
            return None
        fixed = _strings(raw.get("fixed_in"))
        if any(_same_version(q.version, f) for f in fixed):
            return None  # the index lists this very version as the fix
        link = raw.get("link")
        return Finding(
            q.name,
            q.version,
            raw["id"],
            _strings(raw.get("aliases")),
            _summary(raw),
            fixed,
            link=link if isinstance(link, str) else "",
        )


# --------------------------------------------------------------------------- OSV


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
        versions = _strings(entry.get("versions"))
        if versions:
            decided = True
            affected |= any(_same_version(q.version, v) for v in versions)
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
        http = _Http(self._registry, self._timeout)
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
        self, http: _Http, batch: list[Query], named: dict[Query, list[object]]
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
        self, http: _Http, named: dict[Query, list[object]], answer: SourceAnswer
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

        await _bounded(fetch(v) for v in sorted(wanted))
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
            _strings(record.get("aliases")),
            _summary(record),
            fixed,
            severity,
            said,
            _link(record),
        )
