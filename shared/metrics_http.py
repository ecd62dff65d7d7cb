"""`--metrics-listen HOST:PORT`: /metrics in the Prometheus text format, on a local port.

Like node_exporter or a Consul agent: a small threaded HTTP server beside the service, serving
one registry (each side passes its own; nothing uses prometheus-client's global registry).
Scrapes run in the server's threads; collecting reads counters under prometheus-client's locks
and never touches the event loop.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from shared.errors import InvalidArgument, StoreError

# `_created` series double every counter's series count and no dashboard of ours reads them;
# grpc-prometheus has none either. Process-wide in prometheus-client, set before any metric.
disable_created_metrics()  # type: ignore[no-untyped-call]

StartResponse = Callable[..., Any]


def parse_listen(text: str, flag: str = "--metrics-listen") -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535 or not host:
        raise InvalidArgument(flag, f"must be HOST:PORT (e.g. 127.0.0.1:9464), got {text!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InvalidArgument(
                flag, f"HOST must be an IP address or localhost: {text!r}"
            ) from None
    return host, int(port)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: not news
        pass


class _Server(ThreadingWSGIServer):
    pass


def _app(registry: CollectorRegistry) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"script-packages: metrics at /metrics\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; metrics are at /metrics\n"]

    return app


class MetricsServer:
    """`MetricsServer.start("127.0.0.1:9464", registry)`; `.port`; `.close()` (idempotent)."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsServer:
        host, port = parse_listen(listen)
        _Server.address_family = 10 if ":" in host else 2  # AF_INET6 / AF_INET
        try:
            httpd = make_server(host, port, _app(registry), _Server, handler_class=_Quiet)
        except OSError as exc:
            raise StoreError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}"
                " (address in use or not available)"
            ) from None
        thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return cls(httpd, thread)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving and joins the thread (blocks briefly: call it off the event loop)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
