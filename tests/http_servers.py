"""Tiny scripted HTTP servers on loopback: each GET is answered by a plain function.

index = scripted(lambda h: send(h, 302, Location=...))   # the `scripted` fixture (conftest)
index.requests                                            # [(path, headers), ...]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], None]


class Scripted:
    """A loopback HTTP server whose GET answer is a plain function; it records request headers."""

    def __init__(self, answer: Handler) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class _H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, dict(self.headers.items())))
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for k, v in {"Content-Length": str(len(body)), **headers}.items():
        h.send_header(k.replace("_", "-"), v)
    h.end_headers()
    h.wfile.write(body)
