"""Download the wheels a resolution names, each once, hashed while it is written.

    Fetcher.fetch(wheel)   I/O in a worker thread: stream the URL into the work dir, sha256 and
                           size checked against what the index published (the lockfile)

httpx rather than urllib: one pooled client keeps connections to the index alive across the
few dozen files of an install (urllib opens one per file), and its timeouts cover connect, read
and pool waits separately. The client is the synchronous one, used from worker threads: the
bytes are hashed and written there, never on the event loop.

Credentials go only to the index origins (scheme, host and port; core/install/index_client.py
`basic_auth_header`), never along a redirect to another origin, and never over plain http to
a host that is not loopback (refused when the registry config is saved).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from core.install.index_client import basic_auth_header
from core.install.pylock import LockedWheel
from core.state.index_config import RegistrySettings
from shared.errors import IntegrityError, RegistryError, ResolveError

MAX_WHEEL_BYTES = 2 << 30  # nothing on PyPI comes close; a bigger answer is an attack
MAX_REDIRECTS = 5
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchedWheel:
    wheel: LockedWheel
    path: Path
    size: int


def _where(url: str) -> str:
    return urlsplit(url)._replace(query="", fragment="").geturl()  # presigned queries stay out


class Fetcher:
    """One pooled HTTP client for one install; `close()` when done (or `with`)."""

    def __init__(self, settings: RegistrySettings, dest: Path, concurrency: int = 8) -> None:
        self._settings = settings
        self._dest = dest
        timeout = httpx.Timeout(settings.timeout_seconds)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # trust_env for proxies and SSL_CERT_FILE, as the resolver gets them; no .netrc: only
        # our settings carry credentials.
        self._client = httpx.Client(timeout=timeout, limits=limits, follow_redirects=False)
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fetch(self, wheel: LockedWheel) -> FetchedWheel:
        """(Worker thread) The wheel's bytes in the work dir, verified; raises on any mismatch."""
        path = self._target(wheel.filename)
        try:
            size = self._download(wheel, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return FetchedWheel(wheel, path, size)

    def _target(self, filename: str) -> Path:
        with self._lock:  # two environments may share a file name with different bytes
            n = 0
            name = filename
            while name in self._names:
                n += 1
                name = f"{n}-{filename}"
            self._names.add(name)
        return self._dest / name

    def _download(self, wheel: LockedWheel, path: Path) -> int:
        url = wheel.url
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise RegistryError(f"refusing to fetch {_where(url)}: only http(s) URLs")
            headers = {"User-Agent": "spk-core"}
            if auth := basic_auth_header(url, self._settings):
                headers["Authorization"] = auth
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    self._check_status(response, wheel)
                    return self._write(response, wheel, path)
            except httpx.HTTPError as exc:
                raise RegistryError(
                    f"downloading {wheel.filename} from {_where(url)} failed: {exc}"
                ) from None
        raise RegistryError(f"{wheel.filename}: more than {MAX_REDIRECTS} redirects")

    def _check_status(self, response: httpx.Response, wheel: LockedWheel) -> None:
        code = response.status_code
        if code in (401, 403):
            raise RegistryError(
                f"the index rejected the credentials (HTTP {code}) for {wheel.filename};"
                " check the registry username and token"
            )
        if code == 404:
            raise ResolveError(
                f"{wheel.filename} is listed by the index but not served by it (HTTP 404)"
            )
        if code != 200:
            raise RegistryError(f"the index answered HTTP {code} for {wheel.filename}")

    def _write(self, response: httpx.Response, wheel: LockedWheel, path: Path) -> int:
        cap = wheel.size if wheel.size is not None else MAX_WHEEL_BYTES
        hasher = hashlib.sha256()
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for chunk in response.iter_bytes(_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise IntegrityError(
                        f"{wheel.filename}: the download is longer than the {cap} bytes"
                        " the index published; refusing it"
                    )
                hasher.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        if wheel.size is not None and size != wheel.size:
            raise IntegrityError(
                f"{wheel.filename}: downloaded {size} bytes, the index published {wheel.size}"
            )
        digest = hasher.hexdigest()
        if digest != wheel.sha256:
            raise IntegrityError(
                f"'{wheel.name}' {wheel.version}: {wheel.filename} has sha256 {digest}, which is"
                f" not the one the index publishes for it ({wheel.sha256}); refusing it"
            )
        return size
