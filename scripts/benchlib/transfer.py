"""Figures 2 and 3: pulling blobs from a core process vs nginx + curl, peak RSS, the blob chunk
size, and the bytes a one-package change costs on the wire."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from scripts.benchlib.common import (
    PYTHON,
    Bench,
    Row,
    child_env,
    ensure_nginx,
    median,
    remove_tree,
    rss_kib,
)
from scripts.benchlib.cores import BenchCore
from scripts.benchlib.workload import Workload, pin_of
from shared.proto.scriptpkgs.v1 import admin_pb2 as apb
from tests.core_process import eventually
from tests.index_server import free_port
from tests.satellite_process import SatelliteProcess, export_signing_key
from tests.tcp_proxy import TcpProxy

CHUNKS = (64 * 1024, 256 * 1024, 1024 * 1024)
_NGINX_CONF = """worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{ }}
    default_type application/octet-stream;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


class Nginx:
    """Our own nginx: generated config, own prefix dir, loopback port; never the system one."""

    def __init__(self, binary: str, root: Path, prefix: Path) -> None:
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(prefix=prefix, port=self.port, root=root))
        argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(lambda: _port_open(self.port) or self.proc.poll() is not None, timeout=10)
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited; see {prefix / 'error.log'}")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Puller:
    """Runs scripts/benchlib/pull.py against a core with one satellite identity."""

    def __init__(self, bench: Bench, core: BenchCore, name: str) -> None:
        self.bench = bench
        self.core = core
        home = bench.scratch(f"puller-{name}")
        self.token_file = home / "token"
        self.token_file.write_text(core.create_satellite(name))
        self.key_file = export_signing_key(core, home / "core-key.pem")  # type: ignore[arg-type]

    def pull(
        self, data_dir: Path, lockfile_hash: str, *only: str, base_url: str = ""
    ) -> dict[str, float]:
        argv = [PYTHON, "-m", "scripts.benchlib.pull"]
        if base_url:
            argv += ["--base-url", base_url]
        argv += [self.core.target, str(self.token_file)]
        argv += [str(self.key_file), str(data_dir), lockfile_hash, *only]
        os.sync()
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=child_env())
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def run_transfer(bench: Bench, work: Workload, core: BenchCore) -> str:
    """Figure 2 and the chunk sweep; returns the hash of the set + big blob manifest."""
    print("figure 2: transfer (satellite pull vs nginx + curl)", flush=True)
    big_pin = pin_of(work.big)
    core.set_packages([*work.pins, big_pin])
    lockfile_hash, _ = core.install()
    manifest = core.admin().GetManifest(apb.AdminGetManifestRequest(lockfile_hash=lockfile_hash))
    big_sha = next(e.sha256 for e in manifest.entries if e.filename == work.big.name)
    total = sum(e.size for e in manifest.entries)
    puller = Puller(bench, core, "bench-pull")

    ours, walls, curls, curl_syncs = [], [], [], []
    nginx_bin = None if bench.smoke else ensure_nginx()
    on_disk = {p.name.lower(): p.name for p in work.index_dir.iterdir()}
    nginx = Nginx(nginx_bin, work.index_dir, bench.work / "nginx") if nginx_bin else None
    try:
        for r in range(bench.rounds):
            data = bench.scratch(f"pull-{r}")
            start = time.perf_counter()
            result = puller.pull(data, lockfile_hash)
            walls.append(time.perf_counter() - start)
            ours.append(result["seconds"])
            assert result["bytes"] == total, (result, total)
            remove_tree(data)
            if nginx is not None:
                dest = bench.scratch(f"curl-{r}")
                argv = ["curl", "-s", "--fail"]
                for e in manifest.entries:  # the index may have normalised the file's name
                    served = on_disk.get(e.filename.lower(), e.filename)
                    argv += ["-o", str(dest / e.filename), nginx.url(served)]
                os.sync()
                start = time.perf_counter()
                subprocess.run(argv, check=True)
                curls.append(time.perf_counter() - start)
                subprocess.run(["sync", *(str(p) for p in dest.iterdir())], check=True)
                curl_syncs.append(time.perf_counter() - start)
                remove_tree(dest)
    finally:
        if nginx is not None:
            nginx.stop()
    mb = total / 1e6
    peer = median(curls) if curls else None
    bench.add(
        Row(
            "2",
            f"pull {len(manifest.entries)} blobs, {mb:.0f} MB (verified, fsynced)",
            median(ours),
            "s",
            "nginx + curl -o",
            peer,
            "<= 1.5x",
            None if peer is None else median(ours) <= 1.5 * peer,
        )
    )
    if curl_syncs:
        bench.add(
            Row(
                "2",
                "same pull (info)",
                median(ours),
                "s",
                "curl -o, then sync the files",
                median(curl_syncs),
            )
        )
    bench.notes.append(
        f"figure 2: satellite pull process wall incl. interpreter start: median {median(walls):.3f}"
        f" s; pull rounds (s): {', '.join(f'{v:.3f}' for v in ours)}; curl rounds (s):"
        f" {', '.join(f'{v:.3f}' for v in curls) or '-'}"
    )

    hwm = puller.pull(bench.scratch("pull-big"), lockfile_hash, big_sha)
    big_mib = work.big.stat().st_size / 2**20
    bench.add(
        Row(
            "2",
            f"pull process peak RSS, {big_mib:.0f} MiB blob",
            hwm["hwm_kib"] / 1024,
            "MiB",
            target="<= 100 MiB",
            met=hwm["hwm_kib"] <= 100 * 1024,
            note=f"before pulling: {hwm['hwm_before_kib'] / 1024:.1f} MiB",
        )
    )
    _over_http(bench, core, puller, lockfile_hash, manifest, big_sha)
    _chunk_sweep(bench, core, puller, lockfile_hash, big_sha)
    return lockfile_hash


def _over_http(
    bench: Bench,
    core: BenchCore,
    puller: Puller,
    lockfile_hash: str,
    manifest: Any,
    big_sha: str,
) -> None:
    """Figure 2 again with the bytes from nginx serving the blob store (contrib/nginx/
    spk-blobs.conf, as a CDN origin would): the agent's HTTP path, verified and fsynced, against
    `curl -o` of the same files from the same nginx."""
    if bench.smoke and ensure_nginx() is None:
        return
    from tests.nginx_process import Nginx as ContribNginx

    entries = list(manifest.entries)
    total = sum(e.size for e in entries)
    ours, curls = [], []
    with ContribNginx(bench.work / "cdn", blobs_root=core.data_dir) as cdn:
        base = cdn.blob_base_url
        for r in range(bench.rounds):
            data = bench.scratch(f"http-pull-{r}")
            result = puller.pull(data, lockfile_hash, base_url=base)
            assert result["bytes"] == total, (result, total)
            ours.append(result["seconds"])
            remove_tree(data)
            dest = bench.scratch(f"http-curl-{r}")
            argv = ["curl", "-s", "--fail"]
            for e in entries:
                argv += ["-o", str(dest / e.filename), f"{base}/{e.sha256[:2]}/{e.sha256}.whl"]
            os.sync()
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            curls.append(time.perf_counter() - start)
            remove_tree(dest)
        hwm = puller.pull(bench.scratch("http-pull-big"), lockfile_hash, big_sha, base_url=base)
    peer = median(curls)
    bench.add(
        Row(
            "2",
            f"pull {len(entries)} blobs, {total / 1e6:.0f} MB over HTTP from nginx"
            " (verified, fsynced)",
            median(ours),
            "s",
            "curl -o from the same nginx",
            peer,
            "<= 1.5x",
            median(ours) <= 1.5 * peer,
        )
    )
    bench.add(
        Row(
            "2",
            "HTTP pull process peak RSS, big blob",
            hwm["hwm_kib"] / 1024,
            "MiB",
            target="<= 100 MiB",
            met=hwm["hwm_kib"] <= 100 * 1024,
        )
    )
    bench.notes.append(
        f"figure 2 over HTTP rounds (s): pull {', '.join(f'{v:.3f}' for v in ours)};"
        f" curl {', '.join(f'{v:.3f}' for v in curls)}"
    )


def _chunk_sweep(
    bench: Bench, core: BenchCore, puller: Puller, lockfile_hash: str, big_sha: str
) -> None:
    """The servicer's CHUNK_SIZE, measured core process -> satellite process on loopback.

    One core per chunk size runs at once (clones of the same data dir) and the rounds take
    turns, so a change in the machine's load hits every size alike.
    """
    core.stop()
    cores = []
    try:
        for chunk in CHUNKS:
            clone = bench.work / f"chunk-{chunk}" / "core"
            _clone_core_dir(core.data_dir, clone)
            cores.append(BenchCore(clone, chunk).start())
        runs: dict[int, list[float]] = {c.chunk: [] for c in cores}
        size = 0
        for r in range(bench.rounds):
            for c in cores:
                data = bench.scratch(f"chunk-pull-{r}")
                puller.core = c
                result = puller.pull(data, lockfile_hash, big_sha)
                size = int(result["bytes"])
                runs[c.chunk].append(result["seconds"])
                remove_tree(data)
    finally:
        for c in cores:
            c.stop()
        puller.core = core
        core.start()
    rates = {chunk: size / median(times) / 1e6 for chunk, times in runs.items()}
    best = max(rates, key=lambda c: rates[c])
    for chunk, rate in rates.items():
        mark = " (fastest)" if chunk == best else ""
        bench.add(
            Row(
                "2",
                f"blob stream, {chunk // 1024} KiB chunks{mark}",
                rate,
                "MB/s",
                note=f"{size / 2**20:.0f} MiB blob, hashed, written and fsynced; median of"
                f" {len(runs[chunk])}",
            )
        )


def _clone_core_dir(src: Path, dest: Path) -> None:
    """Blobs hard-linked (read-only), the database copied (each core writes its own)."""
    remove_tree(dest.parent)
    dest.parent.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(src), str(dest)], check=True)
    for db_file in dest.rglob("*.sqlite3*"):
        data = db_file.read_bytes()
        db_file.unlink()
        db_file.write_bytes(data)


def run_delta(bench: Bench, work: Workload, core: BenchCore) -> None:
    """Figure 3: one pin changes; bytes on the wire (through a counting proxy) vs the wheel."""
    print("figure 3: delta", flush=True)
    v1, v2 = pin_of(work.delta_v1), pin_of(work.delta_v2)
    root = bench.scratch("delta")
    core.set_packages([*work.pins, v1])
    first, _ = core.install()
    proxy = TcpProxy(core.port)
    sat = SatelliteProcess(core, "bench-delta", root, "--no-drift-watch")  # type: ignore[arg-type]
    sat.target = proxy.target
    try:
        sat.register().start()
        eventually(lambda: sat.current() == first, timeout=600, interval=0.2)
        eventually(lambda: sat.fleet_row().status == "ready", timeout=60, interval=0.2)
        time.sleep(1.0)  # the READY report and its reply are through
        proxy.bytes_down = 0
        core.set_packages([*work.pins, v2])
        second, _ = core.install()
        eventually(lambda: sat.current() == second, timeout=300, interval=0.1)
        row = eventually(
            lambda: (r := sat.fleet_row()).current_hash == second and r.status == "ready" and r,
            timeout=60,
            interval=0.1,
        )
        time.sleep(1.0)
        wire = proxy.bytes_down
    finally:
        sat.stop()
        proxy.close()
    wheel = work.delta_v2.stat().st_size
    overhead = (wire - wheel) / wheel
    bench.add(
        Row(
            "3",
            f"bytes on the wire for a {wheel / 2**20:.2f} MiB wheel change",
            wire,
            "bytes",
            "the wheel",
            wheel,
            "<= 1% over",
            overhead <= 0.01,
            note=f"overhead {wire - wheel:,} B ({overhead:.2%}); the agent counted"
            f" {row.last_pull_bytes:,} B in {row.last_pull_blobs} blob(s)",
        )
    )


def run_agent_rss(bench: Bench, work: Workload, core: BenchCore) -> None:
    """A real agent process syncing a manifest of only the big wheel: its peak RSS."""
    root = bench.scratch("agent-rss")
    core.set_packages([pin_of(work.big)])
    wanted, _ = core.install()
    sat = SatelliteProcess(core, "bench-rss", root, "--no-drift-watch")  # type: ignore[arg-type]
    try:
        sat.register().start()
        eventually(lambda: sat.current() == wanted, timeout=600, interval=0.2)
        assert sat.proc is not None
        hwm = rss_kib(sat.proc.pid, "VmHWM")
    finally:
        sat.stop()
    remove_tree(root)
    bench.add(
        Row(
            "2",
            "agent process peak RSS syncing only the big wheel (pull + unpack + tree)",
            hwm / 1024,
            "MiB",
            target="<= 100 MiB",
            met=hwm <= 100 * 1024,
        )
    )
