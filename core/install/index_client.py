"""Talk to the package index directly: project pages (PEP 691 JSON or PEP 503 HTML).

The resolver decides WHAT to install (core/install/uv_resolver.py); this module reads project
pages to list versions for the admin and to explain a failed resolution in terms of what the
index really has (core/install/diagnosis.py). urllib is blocking, so every request runs in a
worker thread (asyncio.to_thread). Errors are translated in one place (`_translate`):

    HTTP 401/403              -> RegistryError ("the index rejected the credentials ...")
    HTTP 404                  -> NotFound
    other HTTP / socket error -> RegistryError
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from http.client import HTTPException, HTTPResponse
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from core.state.index_config import RegistrySettings, validate_settings
from shared.errors import NotFound, RegistryError, SpkError
from shared.names import normalize_name

VERSIONS_TIMEOUT_SECONDS = 5.0  # an admin is waiting on this one
MAX_PROJECT_PAGE = 32 * 1024 * 1024  # the biggest PyPI project pages are a few MiB
PEP691_JSON = "application/vnd.pypi.simple.v1+json"
ACCEPT_SIMPLE = f"{PEP691_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
_SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tgz", ".tar")


# --------------------------------------------------------------------------- pure helpers


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or default)


def basic_auth_header(url: str, settings: RegistrySettings) -> str | None:
    """The Authorization value for `url`, only if it lives on an index origin and a token is set.

    Scheme, host and port must all match: files on a CDN or over plain http get no credentials.
    """
    if not settings.token or _origin(url) not in {_origin(u) for u in settings.index_urls}:
        return None
    raw = f"{settings.login}:{settings.token}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


@dataclass(frozen=True)
class IndexFile:
    filename: str
    sha256: str | None  # lower-case hex as published, None when the index gave none
    url: str = ""  # as linked from the page (relative links resolved against it)


def _html_sha256(href: str) -> str | None:
    algo, _, value = urlsplit(href).fragment.partition("=")
    return value.lower() if algo == "sha256" and value else None


def project_files(body: bytes, content_type: str, page_url: str = "") -> list[IndexFile]:
    """The files on a project page, PEP 691 JSON or PEP 503 HTML, with their published sha256."""
    if content_type.split(";")[0].strip() in (PEP691_JSON, "application/json"):
        doc = json.loads(body)
        files: list[IndexFile] = []
        for entry in doc.get("files", []):
            if not isinstance(entry, dict) or "filename" not in entry:
                continue
            hashes = entry.get("hashes")
            raw = hashes.get("sha256") if isinstance(hashes, dict) else None
            link = urljoin(page_url, str(entry.get("url", ""))) if entry.get("url") else ""
            files.append(IndexFile(str(entry["filename"]), str(raw).lower() if raw else None, link))
        return files
    parser = _LinkParser()
    parser.feed(body.decode("utf-8", "replace"))
    # PEP 503: the anchor text must equal the file name; the href's last segment is the same
    # thing and survives sloppy servers that put something else in the text.
    return [
        IndexFile(
            unquote(urlsplit(href).path.rsplit("/", 1)[-1]),
            _html_sha256(href),
            urljoin(page_url, href),
        )
        for href in parser.hrefs
    ]


def _version_from_filename(name: str, filename: str) -> str | None:
    try:
        if filename.endswith(".whl"):
            fname, version, _, _ = parse_wheel_filename(filename)
            return str(version) if fname == name else None
        fname, version = parse_sdist_filename(filename)
        return str(version) if fname == name else None
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        pass
    # Legacy files with versions PEP 440 cannot parse: keep them (they sort last).
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return parts[1] if len(parts) >= 5 and canonicalize_name(parts[0]) == name else None
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem, _, raw = filename[: -len(suffix)].rpartition("-")
            return raw if stem and raw and canonicalize_name(stem) == name else None
    return None


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Newest first by PEP 440 (a prerelease ranks below its release), unparseable ones last."""
    parsed: dict[Version, str] = {}
    legacy: list[str] = []
    for raw in versions:
        try:
            parsed.setdefault(Version(raw), str(Version(raw)))
        except InvalidVersion:
            if raw not in legacy:
                legacy.append(raw)
    return [parsed[v] for v in sorted(parsed, reverse=True)] + legacy


def versions_from_filenames(name: str, filenames: Iterable[str]) -> list[str]:
    found = (_version_from_filename(name, f) for f in filenames)
    return sort_versions(v for v in found if v)


# --------------------------------------------------------------------------- HTTP


def _opener() -> urllib.request.OpenerDirector:
    # Only http(s): urllib's default opener would also follow file:, ftp: and data: URLs,
    # and an index (or a redirect) must never make the core read its own disk.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _translate(exc: BaseException, url: str) -> SpkError:
    where = urlsplit(url)._replace(query="", fragment="").geturl()
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (401, 403):
            return RegistryError(
                f"the index rejected the credentials (HTTP {exc.code}) for {where}; "
                "check the registry username and token"
            )
        if exc.code == 404:
            return NotFound(f"{where} was not found on the index (HTTP 404)")
        return RegistryError(f"the index answered HTTP {exc.code} for {where}")
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return RegistryError(f"the index is unreachable at {where}: {reason or type(exc).__name__}")


def open_index_url(
    url: str, settings: RegistrySettings, accept: str, timeout: float
) -> HTTPResponse:
    if urlsplit(url).scheme not in ("http", "https"):
        raise RegistryError(f"refusing to fetch {url!r}: only http(s) URLs are allowed")
    headers = {"Accept": accept, "User-Agent": "spk-core"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
    if auth := basic_auth_header(url, settings):
        # Unredirected: urllib would otherwise replay Authorization to wherever a 3xx points.
        request.add_unredirected_header("Authorization", auth)
    try:
        response: HTTPResponse = _opener().open(request, timeout=timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise _translate(exc, url) from None
    return response


def read_bounded(response: HTTPResponse, size: int, url: str) -> bytes:
    try:
        return response.read(size)
    except (OSError, HTTPException) as exc:  # reset, timeout, truncated body
        raise _translate(exc, url) from None


def _read_capped(response: HTTPResponse, url: str) -> bytes:
    body = read_bounded(response, MAX_PROJECT_PAGE + 1, url)
    if len(body) > MAX_PROJECT_PAGE:
        raise RegistryError(f"the project page {url} is larger than {MAX_PROJECT_PAGE} bytes")
    return body


def _project_files_sync(name: str, settings: RegistrySettings, timeout: float) -> list[IndexFile]:
    """Every file of project `name` on every configured index; NotFound if no index has it."""
    files: list[IndexFile] = []
    found = False
    for index in settings.index_urls:
        url = urljoin(index.rstrip("/") + "/", f"{name}/")
        try:
            with open_index_url(url, settings, ACCEPT_SIMPLE, timeout) as response:
                body = _read_capped(response, url)
                content_type = response.headers.get("Content-Type", "text/html")
        except NotFound:
            continue  # an extra index that lacks the project is normal
        found = True
        files += project_files(body, content_type, url)
    if not found:
        raise NotFound(f"package '{name}' was not found on the index {settings.describe_index()}")
    return files


def project_files_sync(name: str, settings: RegistrySettings, timeout: float) -> list[IndexFile]:
    """(Worker thread) Every file of project `name` on the configured indexes; NotFound if none."""
    return _project_files_sync(name, settings, timeout)


def _versions_sync(name: str, settings: RegistrySettings) -> list[str]:
    files = _project_files_sync(name, settings, VERSIONS_TIMEOUT_SECONDS)
    return versions_from_filenames(name, (f.filename for f in files))


async def package_versions(name: str, settings: RegistrySettings) -> list[str]:
    """Every version of `name` on the configured indexes that has a wheel or sdist, newest first.

    Raises InvalidArgument (bad name), NotFound (on no index), RegistryError (unreachable, 401).
    """
    project = normalize_name(name)
    validate_settings(settings)
    return await asyncio.to_thread(_versions_sync, project, settings)
