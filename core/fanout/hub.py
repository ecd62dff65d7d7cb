"""In-process fan-out of the desired hash: one latest-value slot per subscriber, never a queue.

A subscriber that is slow (or whose stream is stalled by flow control) only ever sees the newest
value; memory per idle subscription is one small object and one asyncio.Event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable


class Subscription:
    __slots__ = ("_closed", "_event", "_hub", "_value", "key", "revoked")

    def __init__(self, hub: Hub, key: str, value: str) -> None:
        self._hub = hub
        self.key = key
        self._value = value
        self._event = asyncio.Event()
        self._event.set()  # the first message goes out at once
        self._closed = False
        self.revoked = False

    def offer(self, value: str) -> None:
        self._value = value
        self._event.set()

    def close(self, revoked: bool = False) -> None:
        self.revoked = revoked
        self._closed = True
        self._event.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def values(self) -> AsyncIterator[str]:
        """Yields the newest value each time it changes; ends when closed."""
        last: str | None = None
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._closed:
                    return
                if self._value != last:
                    last = self._value
                    yield last
        finally:
            self._hub.unsubscribe(self)


class Hub:
    def __init__(self, initial: str = "") -> None:
        self.value = initial
        self._subs: dict[str, set[Subscription]] = {}
        # Called after a change made on this instance (not one read back from the database),
        # so other core instances can be told at once (Postgres NOTIFY).
        self.on_local_change: Callable[[str], None] | None = None

    def subscribe(self, key: str) -> Subscription:
        sub = Subscription(self, key, self.value)
        self._subs.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    def publish(self, value: str, local: bool = True) -> None:
        """Offer `value` to every subscriber; `local=False` for values read back from the DB."""
        if value == self.value:
            return
        self.value = value
        for subs in self._subs.values():
            for sub in subs:
                sub.offer(value)
        if local and self.on_local_change is not None:
            self.on_local_change(value)

    def close_key(self, key: str, revoked: bool = True) -> None:
        """Ends every open stream of one subscriber (a revoked satellite)."""
        for sub in list(self._subs.get(key, ())):
            sub.close(revoked)

    def close_all(self) -> None:
        """Shutdown: end every stream; agents reconnect elsewhere or after the restart."""
        for key in list(self._subs):
            self.close_key(key, revoked=False)

    def is_connected(self, key: str) -> bool:
        return bool(self._subs.get(key))

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())
