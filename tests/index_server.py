"""A real package index on loopback for tests: pypiserver serving a directory of wheels.

    with PackageIndex(wheel_dir) as index:                  # open index
        index.url                                           # http://127.0.0.1:<port>/simple/
    with PackageIndex(wheel_dir, token="s3cret") as index:  # htpasswd, user "__token__"

The server uses the `simple-dir` backend, so wheels written into the directory after start are
served at once, and `--disable-fallback`, so an unknown package is a 404 instead of a redirect
to pypi.org (tests never leave loopback).
"""

from __future__ import annotations

import functools
import hashlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

TOKEN_USER = "__token__"


def free_port() -> int:
    """A port that was free a moment ago (pypiserver cannot report the port it got for -p 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PackageIndex:
    def __init__(self, packages: Path, *, token: str | None = None) -> None:
        self.packages = packages
        self.token = token
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = packages.parent / f"pypiserver-{packages.name}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/simple/"

    def start(self, timeout: float = 15.0) -> PackageIndex:
        self.packages.mkdir(parents=True, exist_ok=True)
        auth = ["-a", ".", "-P", "."]
        if self.token is not None:
            from passlib.apache import HtpasswdFile  # type: ignore[import-untyped]

            htpasswd = self.packages.parent / f"htpasswd-{self.packages.name}"
            users = HtpasswdFile(str(htpasswd), new=True)
            users.set_password(TOKEN_USER, self.token)
            users.save()
            auth = ["-a", "download,list,update", "-P", str(htpasswd)]
        for _attempt in range(5):  # the free port can be taken between probe and bind
            self.port = free_port()
            argv = [sys.executable, "-m", "pypiserver", "run", "-p", str(self.port)]
            argv += ["-i", "127.0.0.1", "--disable-fallback", "--backend", "simple-dir", *auth]
            argv += [
                "--server",
                "gunicorn",
            ]  # wsgiref's 5-slot listen backlog stalls 1 s under load
            argv.append(str(self.packages))
            with self._log.open("ab") as log:
                self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"pypiserver did not start; see {self._log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> PackageIndex:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class StaticIndex:
    """A PEP 503 tree served as plain files; the test writes every project page itself, so a
    link can promise a file the server does not have, carry a wrong sha256 or extra attributes.

        with StaticIndex(tmp_path / "static") as index:
            wheel = build_wheel(spec, index.packages)
            index.publish("c", wheel)                     # link with the file's real sha256
            index.publish("c", wheel, sha256="ab" * 32)   # ... or a lying one
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.packages = root / "packages"
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/simple/"

    def publish(self, name: str, *wheels: Path, sha256: str | None = None, attrs: str = "") -> None:
        links = []
        for wheel in wheels:
            digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
            href = f"/packages/{wheel.name}#sha256={digest}"
            links.append(f'<a href="{href}"{" " + attrs if attrs else ""}>{wheel.name}</a>')
        page = self.root / "simple" / name / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("\n".join(links))

    def __enter__(self) -> StaticIndex:
        self.packages.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietFiles, directory=str(self.root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
