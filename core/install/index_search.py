"""Registry helpers for admins: search project names and list a project's versions.

The simple API has no search endpoint, so search filters the index's project list (PEP 691 JSON
or PEP 503 HTML root page). Both answers are cached briefly: an admin types several queries in a
row, and the root page of a large index is megabytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from html.parser import HTMLParser

from core.install.index_client import (
    ACCEPT_SIMPLE,
    PEP691_JSON,
    open_index_url,
    package_versions,
    read_bounded,
)
from core.state.index_config import RegistrySettings, validate_settings
from shared.errors import InvalidArgument
from shared.names import normalize_name

CATALOG_TTL_SECONDS = 300.0
VERSIONS_TTL_SECONDS = 60.0
MAX_ROOT_PAGE = 128 * 1024 * 1024  # PyPI's root list is tens of MiB
MAX_RESULTS = 100


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self._in_a = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_a = tag == "a"

    def handle_data(self, data: str) -> None:
        if self._in_a and data.strip():
            self.names.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        self._in_a = False


def project_names(body: bytes, content_type: str) -> list[str]:
    """Project names from a simple-API root page (PEP 691 JSON or PEP 503 HTML)."""
    if content_type.split(";")[0].strip() in (PEP691_JSON, "application/json"):
        doc = json.loads(body)
        return [str(p["name"]) for p in doc.get("projects", []) if "name" in p]
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    return parser.names


def rank(names: list[str], query: str, limit: int) -> list[str]:
    """Exact match first, then prefix matches, then substring matches; each alphabetical."""
    wanted = query.lower().replace("_", "-").replace(".", "-")
    normal = {n: n.lower().replace("_", "-").replace(".", "-") for n in set(names)}
    hits = [n for n, low in normal.items() if wanted in low]
    hits.sort(key=lambda n: (normal[n] != wanted, not normal[n].startswith(wanted), normal[n]))
    return hits[:limit]


def _root_names_sync(settings: RegistrySettings) -> list[str]:
    names: list[str] = []
    for index in settings.index_urls:
        url = index.rstrip("/") + "/"
        with open_index_url(url, settings, ACCEPT_SIMPLE, settings.timeout_seconds) as response:
            body = read_bounded(response, MAX_ROOT_PAGE, url)
            names += project_names(body, response.headers.get("Content-Type", "text/html"))
    return names


def _cache_key(settings: RegistrySettings) -> str:
    # Different credentials may see different projects; never keep the token itself around.
    raw = "\n".join([*settings.index_urls, settings.login, settings.token])
    return hashlib.sha256(raw.encode()).hexdigest()


class IndexCatalog:
    """Search and versions with a short cache. One per core process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._now = clock
        self._names: dict[str, tuple[float, list[str]]] = {}
        self._versions: dict[tuple[str, str], tuple[float, list[str]]] = {}

    async def search(self, query: str, settings: RegistrySettings, limit: int = 20) -> list[str]:
        text = query.strip()
        if not text or len(text) > 128 or any(ord(c) < 0x20 for c in text):
            raise InvalidArgument("query", "1-128 printable characters")
        limit = min(limit or 20, MAX_RESULTS)
        validate_settings(settings)
        key = _cache_key(settings)
        cached = self._names.get(key)
        if cached is None or self._now() - cached[0] > CATALOG_TTL_SECONDS:
            names = await asyncio.to_thread(_root_names_sync, settings)
            cached = (self._now(), names)
            self._names = {key: cached}  # one index config at a time: keep memory bounded
        return rank(cached[1], text, limit)

    async def versions(self, name: str, settings: RegistrySettings) -> list[str]:
        project = normalize_name(name)
        key = (_cache_key(settings), project)
        cached = self._versions.get(key)
        if cached is None or self._now() - cached[0] > VERSIONS_TTL_SECONDS:
            cached = (self._now(), await package_versions(project, settings))
            if len(self._versions) > 256:
                self._versions.clear()
            self._versions[key] = cached
        return cached[1]
