"""What an operator reads: `spk-core admin satellites list` (a table), `spk-core admin status`
(one screen) and `spk-core admin install --wait-fleet` (a live progress line, then the names of
the satellites that did not converge). Pure formatting over the admin API's replies, plus the
polling loop of --wait-fleet.

A satellite's state, as every view here counts it (revoked ones are not part of the fleet):

    converged   ready on the hash its environment's desired manifest has
    unserved    no environment of the desired release fits its host
    offline     not converged and no refresh stream open to this core
    error       connected, its last sync failed (the agent retries on its own)
    syncing     connected, syncing or about to (still on an older release)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from shared.proto.scriptpkgs.v1 import admin_pb2 as pb

STATES = ("converged", "syncing", "error", "offline", "unserved")
_INSTALL = {v: k.removeprefix("INSTALL_STATUS_").lower() for k, v in pb.InstallStatus.items()}


def state_of(s: pb.Satellite) -> str:
    if s.unserved:
        return "unserved"
    if s.status == "ready" and s.current_hash == s.desired_hash:
        return "converged"
    if not s.connected:
        return "offline"
    if s.status == "error":
        return "error"
    return "syncing"


@dataclass
class FleetCounts:
    total: int = 0
    by_state: dict[str, list[pb.Satellite]] = field(
        default_factory=lambda: {state: [] for state in STATES}
    )

    @classmethod
    def of(cls, satellites: Sequence[pb.Satellite]) -> FleetCounts:
        counts = cls()
        for s in satellites:
            if not s.revoked:
                counts.total += 1
                counts.by_state[state_of(s)].append(s)
        return counts

    def count(self, state: str) -> int:
        return len(self.by_state[state])

    def line(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in STATES if s != "unserved" or self.count(s)]
        return f"{', '.join(parts)} (of {self.total})"

    @property
    def converged(self) -> bool:
        return self.count("converged") == self.total


def ago(unix: int, now: float) -> str:
    if unix <= 0:
        return "never"
    seconds = max(0, int(now - unix))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def when(unix: int) -> str:
    if unix <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def satellites_table(reply: pb.ListSatellitesResponse, now: float) -> str:
    header = ("NAME", "ENVIRONMENT", "CURRENT", "DESIRED", "STATE", "LAST SEEN", "LAST ERROR")
    rows = [header]
    for s in reply.satellites:
        state = "revoked" if s.revoked else state_of(s)
        rows.append(
            (
                s.name,
                s.environment or "-",
                s.current_hash[:12] or "-",
                s.desired_hash[:12] or "-",
                state,
                "connected" if s.connected else ago(s.last_seen_unix, now),
                _one_line(s.error, 80) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    counts = FleetCounts.of(reply.satellites)
    lines.append(f"fleet: {counts.line()}")
    lines += environment_lines(reply.summary)
    return "\n".join(line.rstrip() for line in lines)


def environment_lines(summary: Sequence[pb.FleetSummary]) -> list[str]:
    """The core's per-environment counts, a line each; unserved and other only when there
    are some (hosts no environment serves have a row of their own)."""
    out = []
    for row in summary:
        counts = [("converged", row.converged), ("syncing", row.syncing), ("error", row.error)]
        counts += [(k, n) for k, n in (("unserved", row.unserved), ("other", row.other)) if n]
        if not row.environment:
            counts = [(k, n) for k, n in counts if n]
        parts = ", ".join(f"{n} {k}" for k, n in counts)
        out.append(f"  {row.environment or '(unserved)':<14} {parts}")
    return out


@dataclass(frozen=True)
class StatusReplies:
    install: pb.InstallState
    releases: pb.ListReleasesResponse
    satellites: pb.ListSatellitesResponse
    backends: pb.ListStorageBackendsResponse
    migration: pb.StorageMigrationState
    gc: pb.BlobGcState


def collect_status(call: Callable[[str, Message], Any]) -> StatusReplies:
    """The six admin calls `spk-core admin status` shows; `call(method, request)`."""
    return StatusReplies(
        install=call("GetInstallState", pb.GetInstallStateRequest()),
        releases=call("ListReleases", pb.ListReleasesRequest()),
        satellites=call("ListSatellites", pb.ListSatellitesRequest()),
        backends=call("ListStorageBackends", pb.ListStorageBackendsRequest()),
        migration=call("GetStorageMigrationState", pb.GetStorageMigrationStateRequest()),
        gc=call("GetBlobGcState", pb.GetBlobGcStateRequest()),
    )


def status_json(r: StatusReplies) -> str:
    doc = {
        f.name: json_format.MessageToDict(getattr(r, f.name), preserving_proto_field_name=True)
        for f in dataclasses.fields(r)
    }
    return json.dumps(doc, indent=2)


def status_screen(r: StatusReplies, now: float) -> str:
    out: list[str] = []
    current = next((rel for rel in r.releases.releases if rel.current), None)
    if current is None:
        out.append("desired release  none yet (run `spk-core admin install`)")
    else:
        out.append(
            f"desired release  {current.sequence}  published {when(current.created_at_unix)}"
            f" ({ago(current.created_at_unix, now)})"
        )
        for m in current.manifests:
            out.append(
                f"  {m.environment:<14} {m.lockfile_hash[:12]}  {m.entry_count} wheels"
                f"  {size(m.total_size)}"
            )
    i = r.install
    line = f"install          {_INSTALL.get(i.status, '?')}"
    if i.status == pb.INSTALL_STATUS_INSTALLING:
        line += f" (phase {i.phase or 'starting'}, {i.wheels_done}/{i.wheels_total} wheels)"
    elif i.finished_at_unix:
        took = max(0, i.finished_at_unix - i.started_at_unix)
        line += f" (finished {when(i.finished_at_unix)}, took {took} s)"
    out.append(line)
    if i.error:
        out.append(f"  error: {_one_line(i.error, 200)}")
    counts = FleetCounts.of(r.satellites.satellites)
    out.append(f"fleet            {counts.line()}")
    out += environment_lines(r.satellites.summary)
    for state in ("error", "offline", "unserved"):
        names = [s.name for s in counts.by_state[state]]
        if names:
            out.append(f"  {state}: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}")
    backends = [
        f"{b.name}{' (active)' if b.active else ''}: {b.blob_count} blobs, {size(b.bytes)}"
        for b in r.backends.backends
    ]
    out.append(f"storage          {'; '.join(backends)}")
    mig = r.migration
    if mig.status == "migrating":
        out.append(f"migration        to {mig.target}: {mig.done}/{mig.total} blobs")
    elif mig.status == "error":
        out.append(f"migration        error (to {mig.target}): {_one_line(mig.error, 160)}")
    elif mig.status == "done":
        out.append(f"migration        done (to {mig.target}, {when(mig.finished_at_unix)})")
    gc = r.gc
    if gc.HasField("last_run"):
        last = gc.last_run
        gc_line = (
            f"gc               last {when(last.finished_at_unix)}: {last.deleted} deleted,"
            f" {size(last.bytes_reclaimed)} reclaimed"
            + (f", {last.failed} failed" if last.failed else "")
        )
    else:
        gc_line = "gc               never ran"
    gc_line += f"; next {when(gc.next_run_unix)}" if gc.next_run_unix else "; not scheduled"
    out.append(gc_line)
    return "\n".join(out)


def wait_fleet(
    list_satellites: Callable[[], pb.ListSatellitesResponse],
    timeout: float,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
) -> int:
    """Follow the fleet until every satellite converged (0) or `timeout` passed (1, naming
    every satellite that did not converge, with its state and error)."""
    deadline = clock() + timeout
    live = out.isatty()
    last = ""
    while True:
        reply = list_satellites()
        counts = FleetCounts.of(reply.satellites)
        line = f"fleet: {counts.line()}"
        if line != last:
            out.write(("\r\033[K" if live else "") + line + ("" if live else "\n"))
            out.flush()
            last = line
        if counts.converged:
            if live:
                out.write("\n")
            return 0
        if clock() >= deadline:
            break
        sleep(poll)
    if live:
        out.write("\n")
    now = time.time()
    behind = [s for state in STATES if state != "converged" for s in counts.by_state[state]]
    err.write(
        f"spk-core admin: {len(behind)} of {counts.total} satellites did not converge within"
        f" {timeout:g} s:\n"
    )
    for s in behind:
        detail = state_of(s)
        if not s.connected:
            detail += f", last seen {ago(s.last_seen_unix, now)}"
        if s.error:
            detail += f": {_one_line(s.error, 160)}"
        err.write(f"  {s.name} ({s.environment or 'no environment'}): {detail}\n")
    return 1
