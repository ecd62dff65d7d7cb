"""The run context: where things live, how rounds are timed, what the machine is."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclass
class Row:
    """One line of the table: our median next to the peer's, and the target it is held to."""

    figure: str
    what: str
    ours: float | None
    unit: str = "s"
    peer: str = ""
    peer_value: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.peer_value:
            return None
        return self.ours / self.peer_value


@dataclass
class Bench:
    """Options and shared state of one run."""

    rounds: int
    smoke: bool
    work: Path  # scratch for this run, deleted at the end unless --keep
    cache: Path  # survives runs: fetched wheels, built big blobs
    only: set[str] = field(default_factory=set)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: list[tuple[str, str]] = field(default_factory=list)
    agents_dir: Path | None = None  # fan-out agents' data dirs (default: under work)

    def wants(self, figure: str) -> bool:
        return not self.only or figure in self.only

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {format_row(row)}", flush=True)
        return row

    def scratch(self, name: str) -> Path:
        """A fresh, empty directory under the run's work dir."""
        path = self.work / name
        remove_tree(path)
        path.mkdir(parents=True)
        return path

    def note_load(self, when: str) -> None:
        self.load.append((when, loadavg()))


def format_row(row: Row) -> str:
    peer = f" | {row.peer} {fmt(row.peer_value, row.unit)}" if row.peer else ""
    ratio = f" | ratio {row.ratio:.2f}x" if row.ratio is not None else ""
    target = f" | target {row.target}: {verdict(row.met)}" if row.target else ""
    return f"[{row.figure}] {row.what}: {fmt(row.ours, row.unit)}{peer}{ratio}{target}"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value >= 0.1 else f"{value * 1000:.1f} ms"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "KiB":
        return f"{value:.1f} KiB"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    return f"{value:.3g} {unit}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_timed(argv: Sequence[str], **kw: object) -> float:
    """Wall time of a whole process (what a user of the peer tool waits for)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start


def pip_download(dest: Path, index_url: str, pins: Sequence[str], no_deps: bool = False) -> float:
    """Seconds for `pip download` of `pins` into `dest` (removed afterwards), no cache: the peer
    of a core install (figures 5 and 10)."""
    argv = [PYTHON, "-m", "pip", "download", "--isolated", "--disable-pip-version-check", "-q"]
    argv += ["--no-cache-dir", "--only-binary=:all:", "--index-url", index_url]
    if no_deps:
        argv.append("--no-deps")
    os.sync()
    elapsed = run_timed([*argv, "-d", str(dest), *pins], env=child_env())
    remove_tree(dest)
    return elapsed


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with our read-only (sealed) directories."""
    if not path.exists() and not path.is_symlink():
        return
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(path, ignore_errors=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def child_env() -> dict[str, str]:
    """What every process we start gets: the repo importable, no fork support in grpc, and none
    of this machine's PIP_* settings (find-links, constraints) leaking into the peers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env["PYTHONPATH"] = str(REPO)
    env["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    return env


def venv_bin(name: str) -> str:
    return str(Path(PYTHON).parent / name)


def ensure_uv() -> str | None:
    """The uv binary from the bench extra, installed into this venv on first use."""
    uv = venv_bin("uv")
    if not Path(uv).exists():
        print("installing uv (the bench extra) into the venv", flush=True)
        subprocess.run([PYTHON, "-m", "pip", "install", "-q", "uv"], check=False)
    return uv if Path(uv).exists() else None


def ensure_nginx() -> str | None:
    """Debian's nginx; installed with apt when missing and we are root. Never the service:
    the bench runs its own instance with a generated config (see transfer.Nginx)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing nginx-light with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=False, env=env)
        found = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
    return found
