"""Bearer-token auth, checked in one interceptor before any handler runs.

This interceptor is also the single place where domain errors (shared.errors) become gRPC
status codes, so servicers stay thin and never build statuses by hand.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from core import fleet
from core.db import AdminToken, Database
from core.secrets import hash_token, new_token
from shared.errors import InvalidArgument, PermissionDenied, SpkError, Unauthenticated

log = logging.getLogger(__name__)
if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

ADMIN_SERVICE = "/scriptpkgs.v1.PackageAdmin/"
DIST_SERVICE = "/scriptpkgs.v1.PackageDistribution/"
ROLES = ("manage", "read")
READ_PREFIXES = ("Get", "List", "Watch", "Search")
BOOTSTRAP_ENV = "SPK_ADMIN_TOKEN"


@dataclass(frozen=True)
class Identity:
    kind: str  # "admin" | "satellite"
    name: str  # role for admins, satellite name for satellites
    role: str = ""


_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "spk_identity", default=None
)


def current_identity() -> Identity:
    ident = _identity.get()
    if ident is None:  # pragma: no cover - the interceptor always sets it
        raise Unauthenticated("no identity")
    return ident


def create_admin_token(role: str, label: str = "") -> str:
    if role not in ROLES:
        raise InvalidArgument("role", f"must be one of {', '.join(ROLES)}")
    token = new_token("spk_admin")
    AdminToken.create(token_hash=hash_token(token), role=role, label=label)
    return token


def ensure_bootstrap_token(token: str) -> None:
    """An operator-provided manage token (from the environment), stored hashed, idempotent."""
    if len(token) < 16:
        raise InvalidArgument(BOOTSTRAP_ENV, "must be at least 16 characters")
    AdminToken.insert(
        token_hash=hash_token(token), role="manage", label="bootstrap"
    ).on_conflict_ignore().execute()


def admin_role(token: str) -> str | None:
    row = AdminToken.get_or_none(AdminToken.token_hash == hash_token(token))
    return None if row is None else str(row.role)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _abort_for(exc: SpkError, context: Ctx) -> None:
    await context.abort(exc.code, exc.message)


def _wrap(handler: Handler, identity: Identity | None, method: str) -> Handler:
    """Same handler kind, with the identity set and SpkError mapped to a status."""

    async def guard(context: Ctx, exc: BaseException) -> None:
        if isinstance(exc, SpkError):
            await _abort_for(exc, context)
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see core log")

    if handler.unary_unary is not None:
        inner_uu: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary_unary(request: Any, context: Ctx) -> Any:
            token = _identity.set(identity)
            try:
                return await inner_uu(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await guard(context, exc)
            finally:
                _identity.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us: Callable[..., AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]

        async def unary_stream(request: Any, context: Ctx) -> Any:
            token = _identity.set(identity)
            try:
                async for item in inner_us(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await guard(context, exc)
            finally:
                _identity.reset(token)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler  # pragma: no cover - we define no client-streaming RPCs


def _deny(handler: Handler, exc: SpkError) -> Handler:
    async def abort(request: Any, context: Ctx) -> Any:
        await context.abort(exc.code, exc.message)

    async def abort_stream(request: Any, context: Ctx) -> Any:
        await context.abort(exc.code, exc.message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            abort_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admin calls need an admin token (read methods accept role `read`); distribution calls a
    satellite token. Health and reflection stay open so load balancers and grpcurl work."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith((ADMIN_SERVICE, DIST_SERVICE)):
            return handler
        try:
            identity = await self._authenticate(method, _bearer(details.invocation_metadata))
        except SpkError as exc:
            return _deny(handler, exc)
        return _wrap(handler, identity, method.rsplit("/", 1)[-1])

    async def _authenticate(self, method: str, token: str | None) -> Identity:
        if token is None:
            raise Unauthenticated("missing bearer token in the 'authorization' metadata")
        name = method.rsplit("/", 1)[-1]
        if method.startswith(DIST_SERVICE):
            satellite = await self._db.run(fleet.authenticate, token)
            if satellite is None:
                raise Unauthenticated("unknown or revoked satellite token")
            return Identity("satellite", satellite)
        role = await self._db.run(admin_role, token)
        if role is None:
            raise Unauthenticated("unknown admin token")
        if role != "manage" and not name.startswith(READ_PREFIXES):
            raise PermissionDenied(f"{name} needs role 'manage'; this token has role '{role}'")
        return Identity("admin", role, role)
