"""One error hierarchy for both sides. Pure: no transport here (core/api/status.py maps these
to gRPC status codes; satellite/client.py maps status codes back).

    SpkError                      base: a failure we raise on purpose, explained for operators
    ├── InvalidArgument           bad input: names the field and the rule
    ├── NotFound                  an unknown package, hash, blob or satellite
    ├── FailedPrecondition        refused now (install running, migration running, ...)
    │   └── SandboxUnavailable    a run's sandbox cannot be set up here: names cause and fix
    ├── Unauthenticated / PermissionDenied
    ├── ResourceExhausted         a per-client cap (concurrent downloads, open streams) is reached
    ├── Unavailable               the other side is down or going away; try again later
    ├── IntegrityError            a hash, size or signature does not match
    │   └── BlobCorrupt           a blob already on disk no longer matches (it was deleted)
    ├── UnsafeWheel               a wheel that could escape its target or lies about its content
    ├── ResolveError              the index cannot satisfy the allowlist (names the package)
    ├── RegistryError             the index is unreachable or refuses the credentials
    └── StoreError                local storage failed (permissions, a missing file, ...)
        └── DiskFull              no space (or quota) left on the data disk: an operator matter

Messages are written for operators and never contain secrets.
"""

from __future__ import annotations

import errno
from typing import Any


class SpkError(Exception):
    """Base class of every error this project raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other arguments than the message (UnsafeWheel(wheel, reason)), which
        # pickle's default would pass back wrongly; errors cross processes (the satellite's
        # unpack workers), so they are rebuilt from their state instead.
        return _rebuild, (type(self), self.message, self.__dict__)


def _rebuild(cls: type[SpkError], message: str, state: dict[str, Any]) -> SpkError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidArgument(SpkError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(SpkError):
    pass


class FailedPrecondition(SpkError):
    pass


class SandboxUnavailable(FailedPrecondition):
    """A run needs a sandbox this host cannot set up (or an untrusted host policy); the script
    never starts. The message names the cause and the fix."""


class Unauthenticated(SpkError):
    pass


class PermissionDenied(SpkError):
    pass


class ResourceExhausted(SpkError):
    pass


class Unavailable(SpkError):
    pass


class IntegrityError(SpkError):
    pass


class BlobCorrupt(IntegrityError):
    """A blob already on disk no longer matches its sha256 (bit rot, tampering). It was deleted."""


class UnsafeWheel(SpkError):
    def __init__(self, wheel: str, reason: str) -> None:
        super().__init__(f"unsafe wheel {wheel}: {reason}")
        self.wheel = wheel
        self.reason = reason


class ResolveError(SpkError):
    pass


class RegistryError(SpkError):
    pass


class StoreError(SpkError):
    pass


class DiskFull(StoreError):
    """The data disk (or the user's quota) is full; freeing space there is the fix."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failure comes down to a full disk, here or anywhere in its cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DiskFull):
            return True
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
