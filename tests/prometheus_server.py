"""A real Prometheus server (Debian package `prometheus`) on loopback, for tests.

.ci/run installs the package when it is missing; a test that needs it fails without it (on
purpose, as the durability test does without strace).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
_METRICS_URL = re.compile(r"metrics on (http://[^\s\"]+/metrics)")


def metrics_url(log_text: str) -> str | None:
    """The /metrics URL a core or agent logged at start (they may listen on port 0)."""
    found = _METRICS_URL.findall(log_text)
    return found[-1] if found else None


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics`: lint a scrape (names, units, help, types); rc 0 when clean."""
    assert PROMTOOL, "promtool not installed (Debian package prometheus; .ci/run installs it)"
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """`with Prometheus(tmp, {"core": "127.0.0.1:9464"}) as prom: prom.query("up")`."""

    def __init__(self, root: Path, targets: dict[str, str], interval: str = "1s") -> None:
        assert PROMETHEUS, "prometheus not installed (Debian package; .ci/run installs it)"
        self.root = root
        self.targets = targets
        self.interval = interval
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "prometheus.log"

    def __enter__(self) -> Prometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in self.targets.items()
        )
        config = self.root / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {self.interval}\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n{jobs}"
        )
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{self.log()}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API; the result vector."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single sample's value of `promql`, None when it has no sample yet."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> dict[str, bool]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as reply:
            body = json.loads(reply.read())
        active = body["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] == "up" for t in active}
