"""Bounds on what a request may carry, checked after auth and before any handler runs.

gRPC's own receive limit answers RESOURCE_EXHAUSTED ("received message larger than max")
without saying which field was at fault, and what a careless client sent by mistake (a file
pasted as a package name) deserves INVALID_ARGUMENT naming the field. So the transport limit is
generous (grpc_server.MAX_RECEIVE, 16 MiB) and this check is the real one: no request of ours needs
more than REQUEST_BYTES in all, or more than STRING_BYTES in one string.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shared.errors import InvalidArgument

REQUEST_BYTES = 1 << 20  # the largest legitimate request (SetPackages of ~10,000 pins) is far below
STRING_BYTES = 64 << 10  # names, versions, URLs, tokens, a sync report's error (4,000 characters)


def _fields(message: Message, prefix: str = "") -> Iterator[tuple[str, object]]:
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        repeated = field.is_repeated
        items = list(enumerate(value)) if repeated else [(None, value)]
        for index, item in items:
            path = name if index is None else f"{name}[{index}]"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if isinstance(item, Message):
                    yield from _fields(item, path + ".")
            else:
                yield path, item


def check_request(request: object) -> None:
    """InvalidArgument naming the field that is too large (or the request, when none alone is)."""
    if not isinstance(request, Message):
        return
    total = request.ByteSize()
    if total <= STRING_BYTES:
        return  # no field can be longer than the whole message: the common case costs one call
    for path, value in _fields(request):
        if isinstance(value, str | bytes):
            length = len(value.encode() if isinstance(value, str) else value)
            if length > STRING_BYTES:
                raise InvalidArgument(
                    path, f"at most {STRING_BYTES} bytes, got {length}; nothing was changed"
                )
    if total > REQUEST_BYTES:
        raise InvalidArgument(
            "request", f"at most {REQUEST_BYTES} bytes in all, got {total}; send less at once"
        )
