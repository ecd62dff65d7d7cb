"""What a wheel may put into an install tree, on top of the structural checks of wheel_checks.

A tree is an import path (`python -I -S` with the tree appended to sys.path), not an installation
prefix with bin/, include/ and share/. So, per the wheel spec's install schemes:

    <dist>.data/purelib, platlib    merged into the tree root (done by the extraction plan)
    <dist>.data/scripts             left out: no tree is on anyone's PATH, and a `#!python`
                                    shebang would have to name an interpreter that lacks the tree
    <dist>.data/headers, data       left out: C headers and prefix data (share/...) have no
                                    place in an import path, and nothing looks for them there
    start-up hooks at the top:      `*.pth`, and `sitecustomize` / `usercustomize` in any form
                                    (.py, .pyc, extension module, package). `site` runs them in
                                    every interpreter that treats the tree as a site dir (an
                                    editor, `site.addsitedir`, an exported tree) or has it on
                                    PYTHONPATH (sitecustomize). The core refuses a wheel that
                                    ships one unless its package is allowed (`--allow-pth`), and
                                    even then the hook is left out of the tree.

The satellite applies the same rules again (AT_SATELLITE) but never refuses a start-up hook: it
cannot know the core's allow list, and leaving the hook out keeps the tree's promise either way.
Left-out entries are still read and checked against RECORD (shared.wheels streams them without
writing), so a wheel that lies about them is refused like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.utils import canonicalize_name

from shared.errors import UnsafeWheel
from shared.wheel_checks import PlannedEntry, WheelInfo

log = logging.getLogger(__name__)

LEFT_OUT_CATEGORIES = frozenset({"scripts", "headers", "data"})
HOOK_MODULES = frozenset({"sitecustomize", "usercustomize"})


@dataclass(frozen=True)
class TreeContentPolicy:
    """Which packages may ship start-up hooks, and whether an unlisted one is refused."""

    # Normalised project names whose start-up hooks are accepted (and left out of the tree).
    allow_startup_hooks: frozenset[str] = frozenset()
    # False at a satellite: the core already decided; the hooks are left out without refusing.
    refuse_startup_hooks: bool = True

    @classmethod
    def allowing(cls, names: Iterable[str]) -> TreeContentPolicy:
        return cls(frozenset(canonicalize_name(n) for n in names))


DEFAULT_CONTENT_POLICY = TreeContentPolicy()
AT_SATELLITE = TreeContentPolicy(refuse_startup_hooks=False)


def startup_hook(target: str) -> bool:
    """Whether `target` (a path relative to the tree root) is something `site` would run."""
    top, slash, _ = target.partition("/")
    if not slash and top.endswith(".pth"):
        return True
    # sitecustomize.py, .pyc, .cpython-311-x86_64-linux-gnu.so, or a sitecustomize/ package
    return top.partition(".")[0] in HOOK_MODULES


def left_out(
    wheel: str, info: WheelInfo, entries: Sequence[PlannedEntry], policy: TreeContentPolicy
) -> frozenset[str]:
    """The install paths of `entries` that stay out of the tree; UnsafeWheel for a refused hook."""
    data_dir = _data_dir(info)
    skipped: set[str] = set()
    hooks: list[str] = []
    for entry in entries:
        raw = entry.info.orig_filename
        top, _, rest = raw.partition("/")
        if top == data_dir and rest.partition("/")[0] in LEFT_OUT_CATEGORIES:
            skipped.add(entry.target)
        elif startup_hook(entry.target):
            skipped.add(entry.target)
            hooks.append(raw)
    if hooks:
        _judge_hooks(wheel, info.name, sorted(hooks), policy)
    return frozenset(skipped)


def _judge_hooks(wheel: str, name: str, hooks: list[str], policy: TreeContentPolicy) -> None:
    allowed = name in policy.allow_startup_hooks
    if policy.refuse_startup_hooks and not allowed:
        raise UnsafeWheel(
            wheel,
            f"entry {hooks[0]!r} is a start-up hook (a top-level .pth, sitecustomize or"
            " usercustomize), which site would run in any interpreter that treats the tree as a"
            f" site dir; refused. If {name} is trusted, allow it (spk-core serve --allow-pth"
            f" {name}); the hook is then left out of the tree",
        )
    # At the satellite a hook in a manifest means the core allowed it (or is not one of ours).
    level = logging.INFO if allowed else logging.WARNING
    log.log(level, "%s: left out start-up hook(s) %s", wheel, ", ".join(hooks))


def _data_dir(info: WheelInfo) -> str:
    for path in info.files:
        top, _, base = path.partition("/")
        if top.endswith(".dist-info") and base == "RECORD":
            return top.removesuffix(".dist-info") + ".data"
    return ""  # unreachable for a planned wheel: plan() requires exactly one dist-info/RECORD
