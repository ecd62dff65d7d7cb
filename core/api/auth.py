"""Bearer-token auth, checked in one interceptor before any handler runs.

This interceptor is also the single place where domain errors (shared.errors) become gRPC
status codes, so servicers stay thin and never build statuses by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from core.api.request_limits import check_request
from core.api.status import status_code
from core.state import fleet
from core.state.db import Database
from core.state.tokens import admin_role
from shared.errors import PermissionDenied, SpkError, Unauthenticated

log = logging.getLogger(__name__)
if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

ADMIN_SERVICE = "/scriptpkgs.v1.PackageAdmin/"
DIST_SERVICE = "/scriptpkgs.v1.PackageDistribution/"
READ_PREFIXES = ("Get", "List", "Watch", "Search")


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


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _is_loopback(peer: str) -> bool:
    """grpc peer strings: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path"."""
    if peer.startswith("unix:"):
        return True
    host = peer.partition(":")[2].rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TransportPolicy:
    """Where bearer tokens may travel. Plaintext is fine on loopback; elsewhere only with TLS,
    unless the operator explicitly passed --insecure."""

    allow_plaintext_tokens: bool = False
    require_client_cert: bool = False  # mTLS for satellites: the cert's CN must be the name


def _check_transport(context: Ctx, policy: TransportPolicy) -> bool:
    """Returns whether the call came over TLS; raises when a token must not be accepted."""
    auth = context.auth_context() or {}
    tls = b"ssl" in auth.get("transport_security_type", [])
    if not tls and not policy.allow_plaintext_tokens and not _is_loopback(context.peer() or ""):
        raise Unauthenticated(
            "bearer tokens are refused over a plaintext connection from a non-loopback peer;"
            " use TLS (or start the core with --insecure on a trusted network)"
        )
    return tls


def _client_cert_name(context: Ctx) -> str | None:
    names = list((context.auth_context() or {}).get("x509_common_name", []))
    return names[0].decode() if names else None


def _wrap(
    handler: Handler, authenticate: Callable[[Ctx], Awaitable[Identity]], method: str
) -> Handler:
    """Same handler kind: authenticate first, then run with the identity set; SpkError -> status.

    Auth runs here rather than in intercept_service because only the call context knows the
    peer address and whether the transport is TLS.
    """

    async def fail(context: Ctx, exc: BaseException) -> None:
        if isinstance(exc, SpkError):
            await context.abort(status_code(exc), exc.message)
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see core log")

    if handler.unary_unary is not None:
        inner_uu: Callable[..., Awaitable[Any]] = handler.unary_unary

        async def unary_unary(request: Any, context: Ctx) -> Any:
            token = None
            try:
                token = _identity.set(await authenticate(context))
                check_request(request)
                return await inner_uu(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc)
            finally:
                if token is not None:
                    _identity.reset(token)  # a unary handler ends in the task it began in

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )

    async def authenticate_or_abort(context: Ctx) -> Identity:
        try:
            return await authenticate(context)
        except Exception as exc:
            await fail(context, exc)
            raise  # pragma: no cover - fail() always aborts

    if handler.unary_stream is not None:
        inner_us: Callable[..., AsyncGenerator[Any, None]] = handler.unary_stream  # type: ignore[assignment]

        async def unary_stream(request: Any, context: Ctx) -> Any:
            # No reset of the identity here: a stream whose client went away (an agent killed
            # mid-download) may be closed by asyncio's async-generator finalizer in another
            # task, where reset() raises "created in a different Context" ("Task exception was
            # never retrieved"). Each RPC runs in its own task, so the value dies with it.
            _identity.set(await authenticate_or_abort(context))
            try:
                check_request(request)
                async with contextlib.aclosing(inner_us(request, context)) as stream:
                    async for item in stream:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler  # pragma: no cover - we define no client-streaming RPCs


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admin calls need an admin token (read methods accept role `read`); distribution calls a
    satellite token. Health and reflection stay open so load balancers and grpcurl work."""

    def __init__(self, db: Database, policy: TransportPolicy | None = None) -> None:
        self._db = db
        self._policy = policy or TransportPolicy()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith((ADMIN_SERVICE, DIST_SERVICE)):
            return handler
        token = _bearer(details.invocation_metadata)

        async def authenticate(context: Ctx) -> Identity:
            return await self._authenticate(method, token, context)

        return _wrap(handler, authenticate, method.rsplit("/", 1)[-1])

    async def _authenticate(self, method: str, token: str | None, context: Ctx) -> Identity:
        if token is None:
            raise Unauthenticated("missing bearer token in the 'authorization' metadata")
        tls = _check_transport(context, self._policy)
        name = method.rsplit("/", 1)[-1]
        if method.startswith(DIST_SERVICE):
            satellite = await self._db.run(fleet.authenticate, token)
            if satellite is None:
                raise Unauthenticated("unknown or revoked satellite token")
            if tls and self._policy.require_client_cert:
                cn = _client_cert_name(context)
                if cn != satellite:
                    raise PermissionDenied(
                        f"client certificate is for {cn!r}, the token for satellite {satellite!r}"
                    )
            return Identity("satellite", satellite)
        role = await self._db.run(admin_role, token)
        if role is None:
            raise Unauthenticated("unknown admin token")
        if role != "manage" and not name.startswith(READ_PREFIXES):
            raise PermissionDenied(f"{name} needs role 'manage'; this token has role '{role}'")
        return Identity("admin", role, role)
