"""The fan-out hub: a latest-value slot per subscriber (never a growing queue), and which
environment of the desired release each host is offered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from core.fanout.hub import Desired, Hub, Offer, offer_for
from shared.environments import Environment, HostEnvironment
from shared.manifest import TargetEnvironment

X86 = TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_17_x86_64")
X86_NEW = TargetEnvironment("3.11", "cp", "cp311", "manylinux_2_28_x86_64")
ARM = TargetEnvironment("3.12", "cp", "cp312", "manylinux_2_28_aarch64")


def host(abi: str, *platforms: str) -> HostEnvironment:
    return HostEnvironment(f"3.{abi[3:]}.1", "cp", abi, platforms)


X86_HOST = host(
    "cp311",
    "linux_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
)
OLD_X86_HOST = host("cp311", "manylinux_2_17_x86_64")
ARM_HOST = host("cp312", "manylinux_2_36_aarch64", "manylinux_2_28_aarch64")


def release(seq: int, *manifests: tuple[str, TargetEnvironment, str]) -> Desired:
    configured = tuple(Environment(n, t) for n, t, _ in manifests)
    return Desired(seq, tuple(manifests), configured, "manylinux_2_36_x86_64")


def simple(seq: int, lockfile_hash: str) -> Desired:
    return release(seq, ("default", X86, lockfile_hash))


async def _take(values: AsyncIterator[Offer], n: int) -> list[str]:
    return [(await asyncio.wait_for(values.__anext__(), 1)).lockfile_hash for _ in range(n)]


async def test_first_value_at_once_then_changes() -> None:
    hub = Hub(simple(1, "h0"))
    values = hub.subscribe("sat").values()
    assert await _take(values, 1) == ["h0"]
    hub.publish(simple(2, "h1"))
    assert await _take(values, 1) == ["h1"]
    await values.aclose()  # type: ignore[attr-defined]
    assert hub.subscriber_count() == 0


async def test_slow_subscriber_sees_only_the_newest() -> None:
    hub = Hub(simple(1, "h0"))
    values = hub.subscribe("sat").values()
    assert await _take(values, 1) == ["h0"]
    for i in range(1, 1000):
        hub.publish(simple(i + 1, f"h{i}"))
    assert await _take(values, 1) == ["h999"]
    # Nothing queued behind it: the next value out is the next one published.
    hub.publish(simple(1001, "sentinel"))
    assert await _take(values, 1) == ["sentinel"]


async def test_republishing_the_same_release_sends_nothing() -> None:
    hub = Hub(simple(1, "h0"))
    values = hub.subscribe("sat", X86_HOST).values()
    await _take(values, 1)
    hub.publish(simple(1, "h0"))
    # A new release that leaves this host's environment alone sends nothing to it either.
    hub.publish(release(2, ("default", X86, "h0"), ("arm", ARM, "a1")))
    # Neither was queued: the next value out is the next change for this host.
    hub.publish(simple(3, "h1"))
    assert await _take(values, 1) == ["h1"]


async def test_close_key_ends_streams_and_marks_revoked() -> None:
    hub = Hub(simple(1, "h0"))
    sub_a, sub_b = hub.subscribe("sat"), hub.subscribe("other")
    a, b = sub_a.values(), sub_b.values()
    await _take(a, 1)
    await _take(b, 1)
    assert hub.is_connected("sat")
    hub.close_key("sat")
    try:
        await asyncio.wait_for(a.__anext__(), 1)
        raise AssertionError("stream should have ended")
    except StopAsyncIteration:
        pass
    assert sub_a.revoked and not hub.is_connected("sat")
    hub.publish(simple(2, "h1"))
    assert await _take(b, 1) == ["h1"]
    hub.close_all()
    assert not sub_b.revoked


def test_each_host_is_offered_its_environment_the_most_specific_winning() -> None:
    desired = release(7, ("default", X86, "d"), ("new", X86_NEW, "n"), ("arm", ARM, "a"))
    assert offer_for(desired, X86_HOST) == Offer("n", "new", 7)  # glibc 2.31: 2_28 beats 2_17
    assert offer_for(desired, OLD_X86_HOST) == Offer("d", "default", 7)
    assert offer_for(desired, ARM_HOST) == Offer("a", "arm", 7)
    assert offer_for(desired, None) == Offer("d", "default", 7)  # an agent that says nothing


def test_a_host_no_environment_fits_is_told_how_to_add_one() -> None:
    desired = release(3, ("default", X86, "d"))
    py313 = host("cp313", "manylinux_2_36_aarch64", "manylinux_2_17_aarch64")
    offer = offer_for(desired, py313)
    assert offer.lockfile_hash == "" and offer.environment == "" and offer.sequence == 3
    assert offer.unserved == (
        "no environment fits cp313-manylinux_2_36_aarch64 (CPython 3.13.1); configured:"
        " default (cp311 manylinux_2_17_x86_64); add one with: spk-core admin envs add NAME"
        " --python 3.13 --abi cp313 --platform manylinux_2_36_aarch64 and install again"
    )
    # Added but not installed yet: the message says so instead.
    pending = Desired(3, desired.manifests, (*desired.configured, Environment("arm", ARM)), "")
    assert "has no manifest for it yet; run an install" in offer_for(pending, ARM_HOST).unserved


def test_nothing_installed_yet_desires_nothing_for_everyone() -> None:
    assert offer_for(Desired(), ARM_HOST) == Offer("")
