"""Advisory sources: what they answer (Findings), their HTTP plumbing, and the index's JSON API.

    JsonApiSource   GET <base>/<name>/<version>/json, field `vulnerabilities` (what PyPI serves
                    and pip-audit's PyPI service reads); no severity in it, so `unknown`
    OsvSource       (core/install/osv.py) POST <url>/v1/querybatch, then GET <url>/v1/vulns/<id>

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
from packaging.version import InvalidVersion, Version

from core.install.index_client import basic_auth_header
from core.state.index_config import RegistrySettings

MAX_BODY = 16 * 1024 * 1024  # PyPI's biggest release JSON is a few MiB
MAX_REDIRECTS = 3
CONCURRENCY = 8
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


class HttpClient:
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


async def bounded(jobs: Iterable[Callable[[], Awaitable[None]]]) -> None:
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


def strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str) and v) if isinstance(value, list) else ()


def summary_of(record: dict[str, object]) -> str:
    for key in ("summary", "details"):
        text = record.get(key)
        if isinstance(text, str) and text.strip():
            line = text.strip().splitlines()[0]
            return line if len(line) <= MAX_SUMMARY else line[: MAX_SUMMARY - 1] + "…"
    return ""


def same_version(a: str, b: str) -> bool:
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
        http = HttpClient(self._registry, self._timeout)
        try:
            await bounded(self._one(http, q, answer) for q in queries)
        finally:
            await http.aclose()
        if queries and not answer.checked:
            raise SourceBroken(
                f"{self.base} knows none of the {len(queries)} packages (HTTP 404 for each):"
                " does it serve the JSON API? Set the audit source (SetAuditPolicy url, or osv)"
            )

    def _one(
        self, http: HttpClient, q: Query, answer: SourceAnswer
    ) -> Callable[[], Awaitable[None]]:
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
        fixed = strings(raw.get("fixed_in"))
        if any(same_version(q.version, f) for f in fixed):
            return None  # the index lists this very version as the fix
        link = raw.get("link")
        return Finding(
            q.name,
            q.version,
            raw["id"],
            strings(raw.get("aliases")),
            summary_of(raw),
            fixed,
            link=link if isinstance(link, str) else "",
        )
