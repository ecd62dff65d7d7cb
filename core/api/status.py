"""The one place domain errors (shared.errors) become gRPC status codes.

Used by the interceptor in core/api/auth.py; servicers only raise. The most specific class wins
(BlobCorrupt is looked up before IntegrityError), and anything unknown is INTERNAL.
"""

from __future__ import annotations

import grpc

from shared import errors

STATUS_CODES: dict[type[errors.SpkError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.UnsafeWheel: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResolveError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RegistryError: grpc.StatusCode.UNAVAILABLE,
    errors.StoreError: grpc.StatusCode.INTERNAL,
}


def status_code(exc: errors.SpkError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
