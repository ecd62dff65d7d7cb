"""Render docs/reliability.md from the figures recorded by the long mode of tests/stress.

    python -m tests.stress.report build/stress-figures.json docs/reliability.md

The prose (how each fault is injected, what must hold, what the runs found) lives here next to
the tests; the numbers come only from the figures file, so the page never shows a number that
was not measured. scripts/stress runs the tests and then this.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

Section = tuple[str, str, str, str]  # figures key, title, how injected, what must hold

SECTIONS: list[Section] = [
    (
        "agent_kill",
        "1. SIGKILL of the agent in the middle of a reconcile",
        "A real agent process (drift watcher on, tree grace 0) alternates between two manifests"
        " of 30 wheels (~4,000 files, 16 MB each, half the wheels shared) through Rollback on"
        " the real core. Before each new target the store is randomly thinned (the other tree"
        " evicted, its own packages discarded, its own blobs deleted) so the reconcile has"
        " download, unpack and assembly work. The agent is SIGKILLed and started again; half the"
        " kill points are uniform over the expected reconcile length (learnt from its own"
        " `flipped ... in N ms` lines), half are aimed at one phase (within 20 ms of the first"
        " sign of downloading, unpacking, assembling, the tree's rename or the flip), so short"
        " windows are hit as often as long ones. The phase it died in is read from what it left"
        " on disk. A separate reader"
        " process pins `current` like `spk-satellite run` and reads and hashes every file of the"
        " pinned tree in a loop for the whole run. `tests/stress/test_agent_kill.py`.",
        "After every kill: `current` resolves to a tree whose files match the wheels' own hashes"
        " (our hashing of the archives) and `store.verify_tree` is clean; `state.json` parses;"
        " every temp entry the dead agent left is gone once the next agent has connected; the"
        " reader never misses or mis-reads a file and `current` never stops resolving.",
    ),
    (
        "connection_cuts",
        "2. Connections cut at random offsets mid-blob",
        "A TcpProxy between a real agent and the real core drops every connection whenever its"
        " downstream byte count passes one of a set of random offsets (each lands inside a blob)."
        " The link is throttled to 32 MiB/s, slower than the agent writes, as a real network is."
        " A fresh satellite pulling the same blobs without cuts gives the protocol overhead."
        " Bytes still queued in the proxy when a cut drops them (SIOCOUTQ) never crossed the"
        " link and are not counted. `tests/stress/test_connection_cuts.py`.",
        "Each blob resumes from the verified size of its partial; what crossed the link beyond"
        " the blobs' own bytes (re-sent data, framing, manifests, reconnects) stays under 10%."
        " What one cut costs is the gRPC message in flight on each open stream: the client keeps"
        " only whole messages, and the core sends 1 MiB messages (the fastest size measured,"
        " core/api/distribution_service.py). So the share re-sent is about (cuts x ~0.4 MB) /"
        " total:"
        " under 10% needs fewer than one cut per ~4-5 MB. The runs use one cut per 12 MiB.",
    ),
    (
        "core_kill_install",
        "3a. SIGKILL of the core during an install",
        "A new version of one package is pinned (so the install resolves with pip AND downloads),"
        " InstallNow starts, and the core is SIGKILLed at a uniformly random moment of the"
        " install's measured length, then started again on the same port and data dir with a"
        " real satellite connected. `tests/stress/test_core_kill.py`.",
        "After the restart the install is `error` with a reason and the previous desired hash"
        " stays (or, if the kill came after the commit, the new hash is desired and `ready`,"
        " never a mix); no resolver scratch (its netrc holds the registry token), half-downloaded"
        " wheel or temp blob is left; no pip outlives the core; the satellite stays ready on the"
        " old hash; the next InstallNow succeeds and the satellite converges.",
    ),
    (
        "core_kill_stream",
        "3b. SIGKILL of the core during a blob stream",
        "A satellite pulls a 32 MiB blob through a 16 MiB/s link; the core is SIGKILLed at a"
        " random point of the transfer and started again. Re-pulled bytes are what crossed the"
        " link beyond the blob; the SIOCOUTQ correction also subtracts bytes the agent had"
        " received but not yet acknowledged, so values within a few 10 KB of zero, negative"
        " ones included, mean nothing was pulled twice.",
        "The install state is untouched; the satellite resumes from its partial and converges;"
        " what it pulls again is only what was in flight (under 10% of the blob); no temp entry"
        " is left on the satellite.",
    ),
    (
        "full_disk",
        "4. A full disk on the satellite",
        "The agent's data dir is a tmpfs of N MiB (`mount -t tmpfs -o size=N`) holding manifest"
        " A; manifest B needs ~10 MiB more. The long mode sweeps N from 1.5 to 9.5 MiB in 0.5 MiB"
        " steps, so the disk fills while downloading, unpacking, assembling or writing state."
        " Where mounting is not permitted, every write under the data dir fails with ENOSPC"
        " instead (tests/stress/enospc_agent.py); the figures say which was used. Then the"
        " filesystem is grown (`mount -o remount,size=256m`). `tests/stress/test_full_disk.py`.",
        "A clean error reported to the core that names the cause (`No space left on device`,"
        " plus what to do), no traceback in the log; `current` still on a verified A; no temp"
        " entry left; and, with no restart and no new install, convergence to B once space is"
        " back. Resumable partial downloads are kept on purpose (`partial_bytes_kept`).",
    ),
    (
        "gc_race_satellite",
        "5a. Tree GC racing flips, repairs and runs (satellite)",
        "In the style of Nix's gc-concurrent test: one thread does what the reconciler's single"
        " worker does (assemble, flip, retire, tree GC with grace 0, and in 10% of rounds a"
        " drift-repair rebuild of `current`), three threads start runs the way `spk-satellite"
        " run` does (resolve `current`, pin, read and hash every file; half keep the pin across"
        " the next round), and an observer checks `current` without pause. A barrier starts every"
        " round of every thread at the same instant. `tests/stress/test_gc_race.py`.",
        "A pinned tree never loses a file while pinned; `current` always resolves; once the pins"
        " are gone, GC leaves only `current`. A run whose tree was flipped away and collected"
        " between its resolve and its pin is refused (`try again`), which is counted, not a"
        " violation: it read nothing.",
    ),
    (
        "gc_race_core",
        "5b. Blob GC racing installs and pulls (core)",
        "The real core with blob GC at grace 0 and keep 0 (the most aggressive policy): one"
        " thread calls GcBlobs in a loop, installs publish new sets meanwhile, a real satellite"
        " pulls each of them, and a checker compares the desired manifest with the blob store"
        " continuously.",
        "Every blob of the desired manifest is in the store whenever that manifest is desired;"
        " installs succeed (GC and installs exclude each other through the installer lock; a"
        " refused InstallNow is retried); the satellite ends on the last set.",
    ),
    (
        "store_gc_race",
        "5c. Store GC racing flips and runs (satellite blobs/ and pkgs/)",
        "One thread does what the reconcile worker does, in its order: materialise a random one"
        " of six manifests (re-pulling and re-unpacking what GC removed), assemble, flip, retire,"
        " then tree and store GC with grace 0, one delta base per distribution and a byte cap of"
        " twice one set; three threads pin `current` and read every file, half keeping the pin"
        " across the next round; a barrier starts every round together."
        " `tests/stress/test_store_gc.py`.",
        "A pinned tree never loses a file (its packages are never deleted while it is on disk);"
        " `current` always resolves and verifies; at the end the store is within the cap unless"
        " what is in use alone exceeds it (`over_cap`, counted).",
    ),
    (
        "store_gc_sigkill",
        "5d. SIGKILL during a store GC pass",
        "A child process runs one store GC pass over a copy of a store holding six versions"
        " (five retired past their grace); it is SIGKILLed at a random moment within the pass's"
        " measured length.",
        "After the next start's cleanup: no temp entry, `current` verifies against the store's"
        " records and the wheels' own hashes, and a complete pass then succeeds.",
    ),
    (
        "batch_kill",
        "5e. SIGKILL during a big batch unpack",
        "A real agent syncs 70 packages (staged packages are published in groups of 32); it is"
        " SIGKILLed as soon as the first group is visible, then restarted.",
        "The packages published before the kill survive it (a crash-looping agent makes"
        " progress), and the restarted agent converges to a verified tree.",
    ),
    (
        "fleet_restart",
        "6. Core restart with the fleet connected",
        "200 satellites (real Agent objects, 4 host processes, drift watching off) are connected"
        " and synced; the core is stopped (SIGTERM: every refresh stream ends at once; and"
        " SIGKILL) and started again on the same port; then a new install is published."
        " Re-subscriptions are counted from the core's own log."
        " `tests/stress/test_fleet_restart.py`.",
        "Every satellite reconnects (exponential backoff with full jitter, base 0.5 s, cap 30 s)"
        " and converges on the new install; none is left behind (checked from the core's view and"
        " from each agent's own).",
    ),
    (
        "durability_satellite",
        "7a. Durability order on the satellite (strace)",
        "A real agent syncs two manifests under `strace -f -y` (fsync, fdatasync, syncfs, the"
        " rename family, link, symlink, mkdir, openat, write, chmod); tests/stress/strace_check.py"
        " checks every publishing rename (source a temp name, destination not).",
        "After the last write, create, mkdir, symlink or chmod of what is renamed there is an"
        " fsync of it or a syncfs (a symlink cannot be opened: its directory's fsync counts),"
        " and after the rename an fsync of the destination directory, before anything published"
        " from it (blob -> package -> tree -> `current`). The checker's own tests feed it each"
        " kind of mistake (tests/stress/test_strace_check.py).",
    ),
    (
        "durability_core",
        "7b. Durability order on the core (strace), and database rows",
        "The real core runs two installs under the same strace. Database rows are not published"
        " by rename: SQLite runs in WAL mode with synchronous=FULL (core/state/db.py), so a commit"
        " returns only after the WAL is fsynced; the test reads both pragmas back from a database"
        " opened by the core's own code (`journal_mode=wal`, `synchronous=2`).",
        "Every blob rename follows the fsync of its temp file and is followed by an fsync of its"
        " shard directory; no WAL write is left without a following fsync of the WAL.",
    ),
    (
        "memory",
        "Memory across reconnects",
        "One real agent reaches the core through a TcpProxy that is cut as soon as each new"
        " refresh stream is up (the core logs each subscription); backoff is shortened so"
        " reconnects come fast. Every cycle is a full reconnect: TCP, HTTP/2, auth, the refresh"
        " stream, a no-op reconcile and its report. After 500 unsampled reconnects (allocator"
        " pools and grpc caches fill first), RSS of both processes is sampled 40 times."
        " `tests/stress/test_memory.py`.",
        "The least-squares RSS slope over the samples after their first fifth stays under the"
        " limit shown (KiB per"
        " 1,000 reconnects); a call or channel leaked per reconnect would cost megabytes per"
        " 1,000.",
    ),
]

FOUND = """\
## What the faults found, and what was fixed

Each fix has a regression test in `tests/test_reliability_fixes.py`; the fault tests above
stay in the suite (short mode) as end-to-end regression tests.

- **A failed sync was never retried (fault 4).** The agent only reconciled when the core sent a
  new hash or the stream reconnected, so a satellite whose disk had filled stayed in `error`
  after space came back (the first runs only recovered when the drift watcher happened to fire).
  Fix: the agent retries a failed sync itself, with full-jitter backoff (`--retry-base` 2 s,
  `--retry-cap` 300 s; a failed repair is retried as a repair), reset by any success.
- **A full disk read as a bug (fault 4).** ENOSPC surfaced as a bare `[Errno 28]` with two
  tracebacks (the failed sync, then the failed `state.json` update). The reconciler now
  recognises ENOSPC/EDQUOT anywhere in the failure chain, logs both without a traceback and adds
  to the reported error that the data disk is full and the agent retries on its own.
- **A killed install left the registry token on disk (fault 3).** SIGKILL skips `finally`, so the
  resolver's scratch dir (`work/resolve-*`, whose netrc holds the token in plaintext) and
  half-downloaded wheels stayed forever. The core now removes them at startup.
- **pip outlived a killed core (fault 3; 6 of 6 kills in the first run).** pip kept resolving on
  its own until its network timeouts. It is now started through `core/install/pip_guard.py`,
  which asks the kernel to SIGKILL it when the core dies (PR_SET_PDEATHSIG, set after exec so no
  Python runs between fork and exec).
- **`installing` with a new desired hash (fault 3, by inspection of the kill window).** The
  install committed the new desired hash and only then set `ready` in a second transaction; a
  kill between the two restarted into "failed, the previous desired hash stays" while the new
  hash was in fact desired. Both now commit in one transaction, as rollback already did.
- **Drift repair made `current` dangle (fault 5: 4 observations in 28 repairs).** A repaired tree
  replaced the old one with two renames, so `current` briefly pointed at nothing (and a crash
  between them left it so until the next sync). Now one `renameat2(RENAME_EXCHANGE)` swaps them
  (shared/fsutil.py; two renames remain the fallback where the kernel cannot).
- **Drift repair deleted a tree a run was reading (fault 5).** The displaced tree was removed at
  once, breaking path walks of runs pinned to it; and after the swap, a run pinned to the old
  tree no longer protected the name it reads through, so GC could delete `trees/<hash>` under
  it. The displaced tree now waits as `trees/.old-*` until unpinned, and GC keeps a retired
  tree's name while a displaced copy of it is pinned.
- **`current`'s link was not fsynced before its rename (fault 7).** Its 70-byte target lives in
  a data block; the data dir is now fsynced after the symlink is created and before the rename.
- **Measuring fault 2 showed the chunk-size trade-off.** A cut costs the message in flight on
  each open stream: with 1 MiB messages 0.4-0.75 MB per cut (561 KB in the long run above), with
  256 KiB ~80 KB, on a throttled link. 256 KiB was tried; the 1 MiB size stays because it is
  measurably faster (docs/benchmarks.md, figure 2), and satellite/materialiser.py writes every
  whole message that arrived before a cut, so a resume starts after them.
"""

LEFT = """\
## Not covered, or left as is

- **Progress under a crash loop (fault 1, found, not fixed).** Packages are unpacked into temp
  dirs and published together once the whole batch is staged (one syncfs; the choice of
  satellite/materialiser.py for speed), so a kill while unpacking discards every package staged
  so far. In a first long run whose kill points were spread uniformly over the reconcile, 147 of
  200 kills landed while unpacking, 504 staged packages were thrown away by restarts, and only 4
  of the 200 reconciles finished: each restart redid the whole batch. Safety held (0
  violations), but an agent killed more often than one batch takes to unpack (an OOM loop)
  would never converge. Publishing staged packages in groups as they finish (one syncfs per
  group, like the core's group commit of reports) would bound the work lost per crash; that
  trades against the one-syncfs batch and is left to the materialiser's owner. The kill points
  of fault 1 are now half uniform, half aimed at each phase, so every window is exercised.
- Power loss is argued from the fsync order (fault 7), not tested by cutting power (no
  dm-flakey/dm-log-writes here). SIGKILL tests cover process crashes only.
- The satellite never deletes blobs or unpacked packages (only trees): disk use grows with
  every distinct wheel until an operator prunes `blobs/` and `pkgs/`. Satellite package GC
  would have to respect trees that link into `pkgs/`, pinned ones included.
- Core blob GC races were run against the SQLite/filesystem core only; Postgres/S3 mode relies
  on the same installer lock (advisory lock across instances) and was not stress-tested here.
- A run that starts exactly while `current` is flipped and the old tree collected (grace 0) is
  refused with "try again" rather than retried on the new tree (counted in 5a). With the
  default one-hour grace the old tree is still there and the run proceeds on it.
- `cleanup_temp` at agent start removes every `trees/.tmp-*`, including an old tree that a crash
  left mid-swap while a run still pinned it (a window of two syscalls).
- Short-mode (CI) figures are smaller runs of the same tests; the numbers above are long mode.
"""


def _flat(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(label, value) rows; nested dicts become `outer / inner` labels."""
    if isinstance(value, dict):
        return [row for key, inner in value.items() for row in _flat(inner, f"{prefix}{key} / ")]
    label = prefix.removesuffix(" / ")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [(f"{label} {i + 1}", json.dumps(v, sort_keys=True)) for i, v in enumerate(value)]
    return [(label, value if isinstance(value, str) else json.dumps(value))]


def _table(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table for a list of per-run dicts (`name` says what a row is)."""
    # The parameter first, the long text last, the rest as recorded.
    columns = sorted(rows[0], key=lambda c: (c != "size_mib", c == "error"))
    out = [f"Per {name.rstrip('s')}:", "", "| " + " | ".join(columns) + " |"]
    out.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "/") for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


def render(figures: dict[str, Any]) -> str:
    total = sum(int(f.get("violations", 0)) for f in figures.values())
    modes = sorted({str(f.get("mode")) for f in figures.values()})
    out = [
        "# Reliability: faults injected, figures measured",
        "",
        _wrap(
            "The promise to an operator: whatever happens to a host or the network, `current`"
            " always points at a complete, verified tree, the core never loses the desired state"
            " or a needed blob, and the fleet converges once the fault is gone. Each fault below"
            " is injected by a test in `tests/stress/`. The normal suite runs them in a short mode"
            " (about two minutes); `scripts/stress` runs the long mode and regenerates this page"
            " from what it measured."
        ),
        "",
        _wrap(
            f"Generated {time.strftime('%Y-%m-%d')} by `scripts/stress` (mode: {', '.join(modes)})"
            f" on {os.cpu_count()} CPUs, Linux {platform.release()}, Python"
            f" {platform.python_version()}; other work shared the machine, so durations are"
            " indicative."
        ),
        "",
        f"**Violations across all faults: {total}.**",
        "",
    ]
    for key, title, how, holds in SECTIONS:
        out += [f"## {title}", "", _wrap(f"**Injected:** {how}"), ""]
        out += [_wrap(f"**Must hold:** {holds}"), ""]
        fig = figures.get(key)
        if fig is None:
            out += ["_Not measured in this run._", ""]
            continue
        runs = {
            k: v for k, v in fig.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        rest = {k: v for k, v in fig.items() if k not in runs and k not in ("mode", "violations")}
        out += ["| figure | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in _flat(rest)]
        for name, rows in runs.items():
            out += ["", *_table(name, rows)]
        out += ["", f"Violations: **{fig.get('violations', 0)}**.", ""]
    out += [FOUND, LEFT]
    return "\n".join(out).rstrip() + "\n"


def main(figures_path: str, doc_path: str) -> int:
    path = Path(figures_path)
    if not path.exists():
        print(f"no figures at {path}; run scripts/stress first", file=sys.stderr)
        return 1
    Path(doc_path).write_text(render(json.loads(path.read_text())))
    print(f"wrote {doc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
