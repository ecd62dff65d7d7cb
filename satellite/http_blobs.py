"""Blob bytes over plain HTTP(S): presigned object-store URLs, a CDN or a mirror (UrlSource).

httpx, like the core's downloads (core/install/fetch.py): one pooled async client per agent,
HTTP/1.1 keep-alive, streaming in large reads so memory stays bounded by the materialiser's two
write batches, and separate connect/read timeouts (a stalled CDN edge is abandoned after
READ_TIMEOUT and the blob falls back to the core). Nothing here trusts what it gets: the store's
sink checks every byte against the signed manifest's size and sha256.

Secrets: no credential is ever sent (no Authorization header, no cookies; the satellite token
stays on the gRPC channel), and errors name only the scheme and host of a URL, because the query
of a presigned URL is a bearer secret until it expires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

from shared.errors import IntegrityError, Unavailable

READ_TIMEOUT = 60.0  # as the gRPC blob stream's idle timeout (satellite/client.py)
CONNECT_TIMEOUT = 10.0
READ_SIZE = 1 << 20


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


class HttpBlobs:
    """`async with HttpBlobs() as urls:` or close() when done."""

    def __init__(self, max_connections: int = 8) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=True,  # a CDN may redirect; nothing secret to carry along
            headers={"User-Agent": "spk-satellite"},
            trust_env=True,  # proxies and SSL_CERT_FILE, as the host configures them
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpBlobs:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def fetch(self, url: str, offset: int) -> AsyncIterator[bytes]:
        if urlsplit(url).scheme not in ("http", "https"):
            raise Unavailable(f"refusing a blob URL that is not http(s) ({_where(url)})")
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            async with self._client.stream("GET", url, headers=headers) as response:
                skip = self._check(response, offset, url)
                async for chunk in response.aiter_bytes(READ_SIZE):
                    if skip:  # a server that ignored the Range: drop what we already hold
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if chunk:
                        yield chunk
        except httpx.HTTPError as exc:
            raise Unavailable(f"{_where(url)}: {type(exc).__name__}") from None

    @staticmethod
    def _check(response: httpx.Response, offset: int, url: str) -> int:
        """Bytes to skip at the start of the body; raises for an answer we cannot use."""
        code = response.status_code
        if offset and code == 206:
            start = response.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                raise IntegrityError(f"{_where(url)} answered range {start!r}, asked {offset}")
            return 0
        if code == 200:
            return offset
        raise Unavailable(f"{_where(url)} answered HTTP {code}")
