"""Read an `strace -f -y` log and check the publish-by-rename durability rule on it.

The rule (issue 7, fault 7): a rename that publishes something comes after the fsync of what it
publishes, and is followed by an fsync of the directory it lands in before anything that
depends on it is published. Concretely, for every publishing rename R (src -> dst) under `root`:

1. content first: after the last write, create, mkdir, symlink or chmod of src (or anything
   below it), and before R, there is an fsync/fdatasync of src itself, or a syncfs(2);
2. then the name: after R there is an fsync of dst's directory, and it comes before anything
   published from it (blob -> package -> tree -> `current`): a package batch renames many into
   `pkgs/` and fsyncs it once, and `current` only flips after `trees/` was fsynced.

A symlink (`current.tmp-*`) cannot be opened to fsync it; the fsync of its directory counts.

A rename is "publishing" when its source is a temp name (`.tmp-*`, `current.tmp-*`, a blob's
`.partial/`) and its destination is not (GC and repair move things *out* of sight; not these).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TRACED = (
    "fsync,fdatasync,syncfs,rename,renameat,renameat2,link,linkat,symlink,symlinkat,"
    "mkdir,mkdirat,openat,write,pwrite64,writev,ftruncate,chmod,fchmod,fchmodat"
)
WRITES = {"write", "pwrite64", "writev", "ftruncate", "fchmod"}
CREATES = {"mkdir", "mkdirat", "symlink", "symlinkat", "chmod", "fchmodat", "link", "linkat"}
RENAMES = {"rename", "renameat", "renameat2"}

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+|\?)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r"^\d+<(.*?)>")


@dataclass(frozen=True)
class Call:
    index: int
    tid: int
    name: str
    args: str
    result: int

    def strings(self) -> list[str]:
        return [s.encode().decode("unicode_escape") for s in _STRING.findall(self.args)]

    def fd_path(self) -> str | None:
        m = _FD_PATH.match(self.args)
        return m.group(1) if m else None


def parse(text: str) -> list[Call]:
    """Completed calls in completion order; unfinished/resumed pairs are joined."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str]] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if u := _UNFINISHED.match(rest):
            pending[tid] = (u.group(1), u.group(2))
            continue
        if r := _RESUMED.match(rest):
            name, head = pending.pop(tid, (r.group(1), ""))
            args, result = head + r.group(2), r.group(3)
        elif c := _CALL.match(rest):
            name, args, result = c.group(1), c.group(2), c.group(3)
        else:
            continue
        calls.append(Call(len(calls), tid, name, args, int(result) if result != "?" else -1))
    return calls


def _touched(call: Call) -> str | None:
    """The path a call creates or changes, if any."""
    if call.result < 0:
        return None
    if call.name in WRITES:
        return call.fd_path()
    if call.name == "openat" and "O_CREAT" in call.args:
        strings = call.strings()
        return strings[0] if strings else None
    if call.name in CREATES:
        strings = call.strings()
        return strings[-1] if strings else None
    return None


def _is_temp(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith((".tmp-", "current.tmp-")) or "/.partial/" in path


def publishing_renames(calls: list[Call], root: Path) -> Iterator[tuple[Call, str, str]]:
    prefix = str(root)
    for call in calls:
        if call.name not in RENAMES or call.result != 0:
            continue
        strings = call.strings()
        if len(strings) < 2:
            continue
        src, dst = strings[0], strings[1]
        moved_aside = os.path.basename(dst).startswith(".old-")  # repair keeps it until unpinned
        if src.startswith(prefix) and _is_temp(src) and not _is_temp(dst) and not moved_aside:
            yield call, src, dst


# What is published next from what: a package is unpacked from a blob, a tree links packages,
# `current` names a tree. A directory fsync must land before its dependents are published.
DEPENDENT = {"blob": "package", "package": "tree", "tree": "current"}


def check(calls: list[Call], root: Path) -> tuple[list[str], dict[str, int]]:
    """Violations of the rule, and how many renames of each kind were checked."""
    problems: list[str] = []
    kinds: dict[str, int] = {}
    renames = [
        (call, src, dst, _kind(dst, root)) for call, src, dst in publishing_renames(calls, root)
    ]
    for r, (call, src, dst, kind) in enumerate(renames):
        kinds[kind] = kinds.get(kind, 0) + 1
        touches = [
            c for c in calls[: call.index]
            if (t := _touched(c)) and (t == src or t.startswith(src + "/"))
        ]  # fmt: skip
        last_touch = touches[-1].index if touches else -1
        # A symlink cannot be opened to fsync it: the fsync of its directory makes it durable.
        link_only = bool(touches) and all(c.name in ("symlink", "symlinkat") for c in touches)
        own = {src, os.path.dirname(src)} if link_only else {src}
        synced = any(
            c.result == 0
            and (c.name == "syncfs" or (c.name in ("fsync", "fdatasync") and c.fd_path() in own))
            for c in calls[last_touch + 1 : call.index]
        )
        if not synced:
            problems.append(
                f"{kind}: rename {src} -> {dst} without a sync of it after its last write"
            )
        parent = os.path.dirname(dst)
        later = [n[0].index for n in renames[r + 1 :] if n[3] == DEPENDENT.get(kind)]
        horizon = later[0] if later else len(calls)
        dir_synced = any(
            c.result == 0 and c.name in ("fsync", "fdatasync") and c.fd_path() == parent
            for c in calls[call.index + 1 : horizon]
        )
        if not dir_synced:
            what = f"before the next {DEPENDENT[kind]} was published" if later else "at all"
            problems.append(f"{kind}: {parent} not fsynced after renaming {dst} into it, {what}")
    return problems, kinds


def _kind(dst: str, root: Path) -> str:
    rel = os.path.relpath(dst, root)
    top = rel.split("/")[0]
    if rel == "current":
        return "current"
    if (
        top in ("blobs", "pkgs", "trees")
        and rel.count("/") <= 2
        and not rel.endswith(".spk-retired")
    ):
        return {"blobs": "blob", "pkgs": "package", "trees": "tree"}[top]
    return f"file {os.path.basename(dst)}"


def wal_unsynced(calls: list[Call]) -> tuple[int, int, list[str]]:
    """(WAL writes, WAL syncs, writes never followed by a WAL sync in the same thread)."""
    writes = syncs = 0
    problems: list[str] = []
    for i, c in enumerate(calls):
        path = c.fd_path() or ""
        if not path.endswith("-wal") or c.result < 0:
            continue
        if c.name in ("fsync", "fdatasync"):
            syncs += 1
        elif c.name in WRITES:
            writes += 1
            follow = (
                d for d in calls[i + 1 :]
                if d.tid == c.tid and d.name in ("fsync", "fdatasync") and d.fd_path() == path
            )  # fmt: skip
            if next(follow, None) is None:
                problems.append(f"WAL write #{i} ({path}) never synced")
    return writes, syncs, problems
