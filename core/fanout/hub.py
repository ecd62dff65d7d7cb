"""In-process fan-out of the desired release: one latest-value slot per subscriber, never a queue.

Each subscriber is offered the hash of the environment that fits its host (shared.environments):
the hub matches hosts against the environments of the desired release, once per distinct host
description per release, so a fan-out to thousands of satellites costs a handful of matches. A
subscriber that is slow (or whose stream is stalled by flow control) only ever sees the newest
offer; memory per idle subscription is one small object and one asyncio.Event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from shared.environments import (
    Environment,
    HostEnvironment,
    choose_environment,
    fits,
    unserved_message,
)
from shared.manifest import TargetEnvironment


@dataclass(frozen=True)
class Desired:
    """The desired release as matched: (environment, its target, lockfile hash), default first.

    `configured` is the admin's current list, only used to explain an unserved host.
    """

    sequence: int = 0
    manifests: tuple[tuple[str, TargetEnvironment, str], ...] = ()
    configured: tuple[Environment, ...] = ()
    native_platform: str = ""

    def environments(self) -> list[Environment]:
        return [Environment(name, target) for name, target, _ in self.manifests]

    def hash_for(self, environment: str) -> str:
        return next((h for name, _, h in self.manifests if name == environment), "")

    def hashes(self) -> set[str]:
        return {h for _, _, h in self.manifests}


@dataclass(frozen=True)
class Offer:
    """What one subscriber is told: its environment's hash, or why none fits its host."""

    lockfile_hash: str
    environment: str = ""
    # Informational: a release that leaves this host's manifest alone is not news to it, so
    # offers differing only here are equal (and not sent again).
    sequence: int = field(default=0, compare=False)
    unserved: str = ""  # non-empty: no environment of the desired release fits


def offer_for(desired: Desired, host: HostEnvironment | None) -> Offer:
    """Pure: the offer for a host (None: an agent that does not describe itself)."""
    if not desired.manifests:
        return Offer("")  # nothing installed yet: nothing desired, for every host
    if host is None:
        name, _, lockfile_hash = desired.manifests[0]
        return Offer(lockfile_hash, name, desired.sequence)
    env = choose_environment(host, desired.environments(), desired.native_platform)
    if env is not None:
        return Offer(desired.hash_for(env.name), env.name, desired.sequence)
    pending = [e for e in desired.configured if fits(host, e, desired.native_platform)]
    if pending:
        reason = (
            f"environment {pending[0].name!r} fits {host.describe()} but the desired release"
            f" (sequence {desired.sequence}) has no manifest for it yet; run an install"
        )
    else:
        reason = unserved_message(host, desired.configured, desired.native_platform)
    return Offer("", "", desired.sequence, reason)


class Subscription:
    __slots__ = ("_closed", "_event", "_hub", "_offer", "host", "key", "revoked")

    def __init__(self, hub: Hub, key: str, host: HostEnvironment | None, offer: Offer) -> None:
        self._hub = hub
        self.key = key
        self.host = host
        self._offer = offer
        self._event = asyncio.Event()
        self._event.set()  # the first message goes out at once
        self._closed = False
        self.revoked = False

    def offer(self, offer: Offer) -> None:
        self._offer = offer
        self._event.set()

    def close(self, revoked: bool = False) -> None:
        self.revoked = revoked
        self._closed = True
        self._event.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def current(self) -> Offer:
        return self._offer

    async def values(self) -> AsyncIterator[Offer]:
        """Yields the newest offer each time it changes; ends when closed."""
        last: Offer | None = None
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._closed:
                    return
                if self._offer != last:
                    last = self._offer
                    yield last
        finally:
            self._hub.unsubscribe(self)


class Hub:
    def __init__(self, initial: Desired | None = None) -> None:
        self.desired = initial or Desired()
        self._subs: dict[str, set[Subscription]] = {}
        self._offers: dict[HostEnvironment | None, Offer] = {}  # per distinct host, this release
        # Called after a change made on this instance (not one read back from the database),
        # so other core instances can be told at once (Postgres NOTIFY).
        self.on_local_change: Callable[[Desired], None] | None = None

    def offer_for(self, host: HostEnvironment | None) -> Offer:
        offer = self._offers.get(host)
        if offer is None:
            offer = self._offers[host] = offer_for(self.desired, host)
        return offer

    def subscribe(self, key: str, host: HostEnvironment | None = None) -> Subscription:
        sub = Subscription(self, key, host, self.offer_for(host))
        self._subs.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    def publish(self, desired: Desired, local: bool = True) -> None:
        """Offer the release to every subscriber; `local=False` for one read back from the DB."""
        if desired == self.desired:
            return
        self.desired = desired
        self._offers = {}
        for subs in self._subs.values():
            for sub in subs:
                sub.offer(self.offer_for(sub.host))
        if local and self.on_local_change is not None:
            self.on_local_change(desired)

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

    def connected_keys(self) -> list[str]:
        return list(self._subs)

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())


def desired_from(
    sequence: int,
    manifests: Sequence[tuple[str, TargetEnvironment, str]],
    configured: Sequence[Environment],
    native_platform: str,
) -> Desired:
    return Desired(sequence, tuple(manifests), tuple(configured), native_platform)
