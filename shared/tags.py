"""Wheel compatibility with an interpreter (PEP 425 tags); pure, no I/O."""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable

from packaging.tags import Tag, interpreter_name, interpreter_version, sys_tags
from packaging.utils import parse_wheel_filename

from shared.environments import HostEnvironment
from shared.errors import InvalidArgument

_POLICY_PREFIXES = ("manylinux", "musllinux")


@functools.cache
def _interpreter_tags() -> frozenset[Tag]:
    # sys_tags() yields ~1,000 tags on manylinux and costs milliseconds: compute it once.
    return frozenset(sys_tags())


def unsupported_wheels(
    filenames: Iterable[str], supported: Iterable[Tag] | None = None
) -> list[str]:
    """The filenames (in input order) none of whose tags is in `supported`.

    `supported` defaults to this interpreter's tags. A filename that is not a valid wheel name
    raises InvalidArgument rather than being silently called unsupported.
    """
    accepted = _interpreter_tags() if supported is None else frozenset(supported)
    unsupported = []
    for filename in filenames:
        try:
            tags = parse_wheel_filename(filename)[3]
        except ValueError as exc:
            rule = f"{filename!r} is not a valid wheel filename: {exc}"
            raise InvalidArgument("wheel filename", rule) from None
        if accepted.isdisjoint(tags):
            unsupported.append(filename)
    return unsupported


def describe_interpreter() -> str:
    """The most specific tag of this interpreter, for operators, e.g.
    "cp311 / manylinux_2_36_x86_64 (CPython 3.11.7)"."""
    tags = sys_tags()  # most specific first
    best = next(tags)
    # On Linux the first tag is the bare linux_<arch> of local builds; the first manylinux or
    # musllinux platform says which glibc/musl wheels from an index fit, which is what matters.
    policy = next((t.platform for t in tags if t.platform.startswith(_POLICY_PREFIXES)), None)
    implementation = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{best.interpreter} / {policy or best.platform} ({implementation})"


@functools.cache
def describe_host() -> HostEnvironment:
    """This interpreter as the core matches it against its environments (sent on subscribe)."""
    platforms: list[str] = []
    for tag in _ordered_tags():
        if tag.platform not in platforms and tag.platform != "any":
            platforms.append(tag.platform)
    return HostEnvironment(
        python_version=platform.python_version(),
        implementation=interpreter_name(),
        abi=f"{interpreter_name()}{interpreter_version()}",
        platforms=tuple(platforms),
    )


def native_platform() -> str:
    """The most specific policy platform tag of this interpreter, e.g. manylinux_2_36_x86_64."""
    return describe_host().best_platform


@functools.cache
def _ordered_tags() -> tuple[Tag, ...]:
    return tuple(sys_tags())
