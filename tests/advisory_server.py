"""A fake advisory service on loopback: the one fake of the audit tests (a service we do not own).

It serves the same fixture records in both formats the core reads:

    GET  /pypi/<name>/<version>/json   PyPI's JSON API: `vulnerabilities` (no severity)
    POST /v1/querybatch                OSV: per query `vulns` of ids + `modified` only, as
                                       api.osv.dev answers (or full records: `full_batch`)
    GET  /v1/vulns/<id>                OSV: the full record

    with AdvisoryServer(FIXTURES) as adv:
        adv.url                         http://127.0.0.1:<port>
        adv.status["beta"] = 500        the JSON API answers 500 for beta (or "querybatch")
        adv.delay = 10.0                every answer waits 10 s (a hung source)
        adv.sloppy = True               answer every record of a package, whatever its version
        adv.requests                    [(method, path, headers), ...]

Records name affected versions explicitly (`affected[].versions`); the ranges they also carry
are for the core's own check, which `sloppy` exercises.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Record = dict[str, Any]


def osv_record(
    vuln_id: str,
    package: str,
    versions: list[str],
    *,
    fixed: str | None = None,
    aliases: tuple[str, ...] = (),
    summary: str = "",
    severity: str | None = None,
    cvss: str | None = None,
) -> Record:
    events: list[dict[str, str]] = [{"introduced": "0"}]
    if fixed:
        events.append({"fixed": fixed})
    record: Record = {
        "id": vuln_id,
        "modified": "2026-11-30T00:00:00Z",
        "aliases": list(aliases),
        "summary": summary,
        "details": f"{summary}\n\nMore words about {vuln_id}.",
        "affected": [
            {
                "package": {"name": package, "ecosystem": "PyPI"},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
                "versions": versions,
            }
        ],
        "references": [{"type": "ADVISORY", "url": f"https://example.invalid/{vuln_id}"}],
    }
    if severity:
        record["database_specific"] = {"severity": severity}
    if cvss:
        record["severity"] = [{"type": "CVSS_V3", "score": cvss}]
    return record


# alpha 1.0: one vulnerability published three times (PYSEC, GHSA, and a CVE id as alias of
# both): must merge into one advisory, severity from the GHSA record. alpha 1.1 is the fix.
# beta 2.0: a moderate one. gamma 3.0: a record with no severity at all.
FIXTURES: list[Record] = [
    osv_record(
        "PYSEC-2026-11",
        "alpha",
        ["1.0"],
        fixed="1.1",
        aliases=("CVE-2026-1111", "GHSA-aaaa-bbbb-cccc"),
        summary="alpha evaluates templates from untrusted input",
    ),
    osv_record(
        "GHSA-aaaa-bbbb-cccc",
        "alpha",
        ["1.0"],
        fixed="1.1",
        aliases=("CVE-2026-1111",),
        summary="Template injection in alpha",
        severity="HIGH",
        cvss="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H",
    ),
    osv_record(
        "GHSA-dddd-eeee-ffff",
        "beta",
        ["2.0"],
        fixed="2.1",
        summary="beta leaks a header",
        severity="MODERATE",
        cvss="CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N",
    ),
    osv_record("PYSEC-2026-33", "gamma", ["3.0"], summary="gamma crashes on long input"),
]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class AdvisoryServer:
    def __init__(self, records: list[Record]) -> None:
        self.records: dict[str, Record] = {r["id"]: r for r in records}
        self.status: dict[str, int] = {}  # package name or "querybatch"/"vulns" -> HTTP status
        self.malformed: dict[str, list[Any]] = {}  # package -> extra raw entries to answer
        self.delay = 0.0
        self.sloppy = False
        self.full_batch = False
        self.json_without_field = False  # a JSON API that does not publish `vulnerabilities`
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def matching(self, name: str, version: str) -> list[Record]:
        found = []
        for record in self.records.values():
            for affected in record.get("affected", []):
                if _canonical(affected["package"]["name"]) != _canonical(name):
                    continue
                if self.sloppy or version in affected.get("versions", []):
                    found.append(record)
                    break
        return found

    def known_packages(self) -> set[str]:
        return {
            _canonical(a["package"]["name"]) for r in self.records.values() for a in r["affected"]
        }

    def _pypi_entry(self, record: Record) -> dict[str, Any]:
        fixed = [
            e["fixed"]
            for a in record["affected"]
            for r in a.get("ranges", [])
            for e in r["events"]
            if "fixed" in e
        ]
        return {
            "id": record["id"],
            "aliases": record.get("aliases", []),
            "details": record.get("details", ""),
            "summary": record.get("summary") or None,
            "fixed_in": fixed,
            "link": f"https://osv.dev/vulnerability/{record['id']}",
            "source": "osv",
            "withdrawn": None,
        }

    # ---- answers ------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if self.delay:
            time.sleep(self.delay)
        if method == "GET" and (m := re.fullmatch(r"/pypi/([^/]+)/([^/]+)/json", path)):
            name, version = m.group(1), m.group(2)
            if name in self.status:
                return self.status[name], {"message": "injected failure"}
            if name not in self.known_packages() and name not in self.malformed:
                return 404, {"message": "Not Found"}
            vulns: list[Any] = [self._pypi_entry(r) for r in self.matching(name, version)]
            vulns += self.malformed.get(name, [])
            doc: dict[str, Any] = {"info": {"name": name, "version": version}, "urls": []}
            if not self.json_without_field:
                doc["vulnerabilities"] = vulns
            return 200, doc
        if method == "POST" and path == "/v1/querybatch":
            if "querybatch" in self.status:
                return self.status["querybatch"], {"message": "injected failure"}
            queries = json.loads(body)["queries"]
            results = []
            for q in queries:
                name, version = _canonical(q["package"]["name"]), q["version"]
                found: list[Any] = [
                    r if self.full_batch else {"id": r["id"], "modified": r["modified"]}
                    for r in self.matching(name, version)
                ]
                found += self.malformed.get(name, [])
                results.append({"vulns": found} if found else {})
            return 200, {"results": results}
        if method == "GET" and (m := re.fullmatch(r"/v1/vulns/([^/]+)", path)):
            if "vulns" in self.status:
                return self.status["vulns"], {"message": "injected failure"}
            record = self.records.get(m.group(1))
            return (200, record) if record else (404, {"message": "Bug not found."})
        return 404, {"message": "Not Found"}

    def __enter__(self) -> AdvisoryServer:
        outer = self

        class _H(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                outer.requests.append((method, self.path, dict(self.headers.items())))
                length = int(self.headers.get("Content-Length") or 0)
                status, doc = outer.answer(method, self.path, self.rfile.read(length))
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]


def headers_to(adv: AdvisoryServer, prefix: str) -> list[Mapping[str, str]]:
    return [h for _, p, h in adv.requests if p.startswith(prefix)]
