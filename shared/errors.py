"""One error hierarchy for both sides, and its mapping to gRPC status codes.

    SpkError                      base; `code` is the gRPC status it maps to
    ├── InvalidArgument           bad input: names the field and the rule
    ├── NotFound                  an unknown package, hash, blob or satellite
    ├── FailedPrecondition        refused now (install running, migration running, ...)
    ├── Unauthenticated / PermissionDenied
    ├── ResourceExhausted         a per-client cap (concurrent downloads, open streams) is reached
    ├── IntegrityError            a hash, size or signature does not match
    ├── UnsafeWheel               a wheel that could escape its target or lies about its content
    ├── ResolveError              the index cannot satisfy the allowlist (names the package)
    ├── RegistryError             the index is unreachable or refuses the credentials
    └── StoreError                local storage failed (disk full, permissions, ...)

Messages are written for operators and never contain secrets.
"""

from __future__ import annotations

import grpc


class SpkError(Exception):
    """Base class of every error this project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SpkError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(SpkError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SpkError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(SpkError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SpkError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SpkError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class IntegrityError(SpkError):
    code = grpc.StatusCode.DATA_LOSS


class UnsafeWheel(SpkError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, wheel: str, reason: str) -> None:
        super().__init__(f"unsafe wheel {wheel}: {reason}")
        self.wheel = wheel
        self.reason = reason


class ResolveError(SpkError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RegistryError(SpkError):
    code = grpc.StatusCode.UNAVAILABLE


class StoreError(SpkError):
    code = grpc.StatusCode.INTERNAL
