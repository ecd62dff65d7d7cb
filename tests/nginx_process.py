"""A real nginx on loopback for tests, configured with the files shipped in contrib/nginx/.

    with Nginx(tmp_path, lb_upstreams=[core_a.target, core_b.target]) as lb:
        lb.grpc_target                    # 127.0.0.1:<port>, for satellites and admins
    with Nginx(tmp_path, blobs_root=core.data_dir) as cdn:
        cdn.blob_base_url                 # http://127.0.0.1:<port>/blobs

Only the lines marked DEPLOY in contrib/nginx/*.conf are replaced (the listen address, the
upstream list, the blob store's root), so the tests run what operators are told to run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.index_server import free_port

REPO = Path(__file__).resolve().parents[1]
CONTRIB = REPO / "contrib" / "nginx"

MAIN = """\
user root;  # tests only: workers read the core's 0700 data dir
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    log_format spk '$remote_addr "$request" $status $body_bytes_sent "auth=$http_authorization"';
    access_log {prefix}/access.log spk;
    client_body_temp_path {prefix}/tmp-body;
    proxy_temp_path {prefix}/tmp-proxy;
    fastcgi_temp_path {prefix}/tmp-fastcgi;
    uwsgi_temp_path {prefix}/tmp-uwsgi;
    scgi_temp_path {prefix}/tmp-scgi;
{includes}
}}
"""


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _deploy(text: str, replacements: dict[str, str]) -> str:
    """Replace the DEPLOY-marked directives named in `replacements` (directive -> value)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)(listen|include|root)\b.*# DEPLOY", line)
        if m and m.group(2) in replacements:
            line = f"{m.group(1)}{m.group(2)} {replacements[m.group(2)]};"
        out.append(line)
    return "\n".join(out) + "\n"


class Nginx:
    def __init__(
        self,
        root: Path,
        lb_upstreams: list[str] | None = None,
        blobs_root: Path | None = None,
    ) -> None:
        if shutil.which("nginx") is None:
            raise AssertionError("nginx is not installed: .ci/run installs it (Debian nginx)")
        self.prefix = root / f"nginx-{free_port()}"
        self.lb_upstreams = lb_upstreams
        self.blobs_root = blobs_root
        self.grpc_port = free_port() if lb_upstreams is not None else 0
        self.http_port = free_port() if blobs_root is not None else 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def blob_base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/blobs"

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def set_upstreams(self, targets: list[str]) -> None:
        """Rewrite the instance list and reload (SIGHUP), as an operator would."""
        self.lb_upstreams = targets
        self._write_upstreams()
        if self.proc is not None:
            subprocess.run(["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                            "-s", "reload"], check=True, capture_output=True)  # fmt: skip

    def _write_upstreams(self) -> None:
        assert self.lb_upstreams is not None
        lines = [f"server {t} max_fails=1 fail_timeout=5s;" for t in self.lb_upstreams]
        (self.prefix / "spk-core-upstreams.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> Nginx:
        for _attempt in range(4):  # a free port can be taken between the probe and nginx's bind
            if self._start_once():
                return self
            self.grpc_port = free_port() if self.grpc_port else 0
            self.http_port = free_port() if self.http_port else 0
        raise RuntimeError(f"nginx did not start: {self.error_log()}")

    def _start_once(self) -> bool:
        """True once nginx listens; False when a port was taken (the config is rewritten)."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        includes = []
        if self.lb_upstreams is not None:
            self._write_upstreams()
            conf = _deploy(
                (CONTRIB / "spk-core.conf").read_text(),
                {
                    "listen": f"127.0.0.1:{self.grpc_port} http2",
                    "include": str(self.prefix / "spk-core-upstreams.conf"),
                },
            )
            (self.prefix / "spk-core.conf").write_text(conf)
            includes.append(f"    include {self.prefix / 'spk-core.conf'};")
        if self.blobs_root is not None:
            conf = _deploy(
                (CONTRIB / "spk-blobs.conf").read_text(),
                {"listen": f"127.0.0.1:{self.http_port}", "root": str(self.blobs_root)},
            )
            (self.prefix / "spk-blobs.conf").write_text(conf)
            includes.append(f"    include {self.prefix / 'spk-blobs.conf'};")
        main = MAIN.format(prefix=self.prefix, includes="\n".join(includes))
        (self.prefix / "nginx.conf").write_text(main)
        argv = ["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        log = (self.prefix / "stdout.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        # Probing a port is not enough: another process holding it would answer, while nginx
        # retries its bind for ~2 s and exits. Wait until nginx's own sockets listen on them.
        deadline = time.monotonic() + 10
        ports = {p for p in (self.grpc_port, self.http_port) if p}
        while not ports <= _listening_ports(self.proc.pid):
            if self.proc.poll() is not None:
                if "Address already in use" in self.error_log() + self._stdout():
                    return False  # a free port was taken between the probe and the bind
                raise RuntimeError(f"nginx did not start: {self.error_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {self.error_log()}")
            time.sleep(0.05)
        return True

    def _stdout(self) -> str:
        path = self.prefix / "stdout.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
