"""What a wheel says about itself: WHEEL's Wheel-Version, METADATA's Name and Version.

Pure: each reader takes one opened member and returns what it found or raises BadFields with the
rule. shared.wheel_checks.plan opens the members, turns BadFields into UnsafeWheel naming the entry,
and compares the identity with the filename. Both files are read the way pip reads them (email
header format, first value wins), so a wheel is refused here only for what pip or the spec refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

_MAX_FIELD = 64 << 10  # one field we keep (a name, a version, a specifier); far above any real one
# email.feedparser.headerRE: what still counts as a header line (or the "From " envelope).
_FIELD_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # the end of a line that ends in CR alone
# pip reads Wheel-Version as dot-separated ints; ASCII digits only (int() also takes " 1" and
# the digits of other scripts).
_WHEEL_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")
SUPPORTED_WHEEL_MAJOR = 1


class BadFields(ValueError):
    """A WHEEL or METADATA member breaks a rule; the message is the rule, for the entry's error."""


class Lines(Protocol):
    def readline(self, limit: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """METADATA's claims about the distribution, as written there (stripped)."""

    name: str
    version: str
    requires_python: str | None


def read_fields(f: Lines, wanted: set[str]) -> dict[str, list[str]]:
    """The values of the `wanted` (lower-case) fields of an email-header file, in order.

    Lines are split as email.parser splits them: a field line or its indented continuation,
    until a blank or non-field line. Only wanted fields are kept and the body is never read, so
    a description of megabytes costs one pass over the headers and no memory; a kept field over
    _MAX_FIELD bytes is refused rather than buffered.
    """
    kept: dict[str, list[bytearray]] = {}
    current: bytearray | None = None  # the value being read; None while skipping a field
    whole_line = True  # readline() stops at its limit, so a long line arrives in pieces
    for line in _lines(f):
        value = line
        if whole_line and line[:1] not in (b" ", b"\t"):  # else a continuation: same field
            if not _FIELD_LINE.match(line):
                break
            key, _, value = line.partition(b":")
            current = None
            # Keys match case-insensitively but are not stripped, as in email.message.
            if (name := key.decode("latin-1").lower()) in wanted:
                current = bytearray()
                kept.setdefault(name, []).append(current)
        whole_line = line.endswith((b"\n", b"\r"))
        if current is not None:
            current += value
            if len(current) > _MAX_FIELD:
                raise BadFields(f"has a field over {_MAX_FIELD} bytes")
    fields: dict[str, list[str]] = {}
    for name, values in kept.items():
        try:
            fields[name] = [value.decode("utf-8").strip() for value in values]
        except UnicodeDecodeError:
            raise BadFields(f"has a {name!r} field that is not UTF-8") from None
    return fields


def _lines(f: Lines) -> Iterator[bytes]:
    """The lines of `f` split where email splits them (LF, CRLF or a lone CR), long ones in pieces.

    A lone CR counts: otherwise "X: y<CR>Name: evil" would hide from us a Name that pip reads.
    """
    while chunk := f.readline(_MAX_FIELD):
        yield from filter(None, _LONE_CR.split(chunk))


def wheel_version(f: Lines) -> str:
    """WHEEL's Wheel-Version, refused unless its major is one this installer knows."""
    values = read_fields(f, {"wheel-version"}).get("wheel-version")
    if not values:
        raise BadFields("has no Wheel-Version")
    text = values[0]
    if not _WHEEL_VERSION.fullmatch(text):
        raise BadFields(f"has Wheel-Version {text!r}; need numbers such as 1.0")
    # The spec: an installer must refuse a major version above the one it supports (a new major
    # may change what the layout means) and may only warn about a newer minor.
    if int(text.partition(".")[0]) > SUPPORTED_WHEEL_MAJOR:
        known = f"{SUPPORTED_WHEEL_MAJOR}.x"
        raise BadFields(
            f"says Wheel-Version {text} is not supported (this installer knows {known})"
        )
    return text


def identity(f: Lines, name: str, version: Version) -> Identity:
    """METADATA's Name, Version and Requires-Python, refused unless they match the filename.

    `name` is the filename's (canonical), `version` its version. Checked here rather than left
    to pip, which refuses a mismatch only when it resolves, and never at the satellite.
    """
    fields = read_fields(f, {"name", "version", "requires-python"})
    claimed: dict[str, str] = {}
    for key, label in (("name", "Name"), ("version", "Version")):
        values = fields.get(key) or [""]
        # Single-use fields: readers disagree on which of two wins, so two must agree.
        if len(set(values)) > 1:
            raise BadFields(f"has {len(values)} different {label} fields {sorted(set(values))}")
        if not values[0]:
            raise BadFields(f"has no {label} field")
        claimed[key] = values[0]
    if canonicalize_name(claimed["name"]) != name:
        raise BadFields(
            f"has Name {claimed['name']!r}, but the filename names {name!r};"
            " METADATA Name must match the wheel filename"
        )
    try:
        same = Version(claimed["version"]) == version
    except InvalidVersion:
        same = False
    if not same:
        raise BadFields(
            f"has Version {claimed['version']!r}, but the filename says {str(version)!r};"
            " METADATA Version must match the wheel filename"
        )
    requires_python = fields.get("requires-python", [None])[0]  # informational: first wins
    return Identity(claimed["name"], claimed["version"], requires_python)
