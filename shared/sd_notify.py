"""systemd's notify protocol (sd_notify(3)) in a few lines, without libsystemd.

Under `Type=notify` systemd sets NOTIFY_SOCKET (a datagram socket: a path, or `@name` for the
abstract namespace) and waits for `READY=1` before it counts the service as started; `STOPPING=1`
says a shutdown began; with `WatchdogSec=` it also sets WATCHDOG_USEC and kills the service when
`WATCHDOG=1` stops arriving. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

    notifier = Notifier.from_environ()
    notifier.ready("serving on :50051")
    async with notifier.watchdog():    # pings at half the interval while the event loop runs
        ...
    notifier.stopping()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to one socket; `None` socket: does nothing."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        raw_usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited it is not it.
        if raw_usec.isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(raw_usec)
        return cls(address, usec)

    @property
    def active(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; whether it was sent (never raises)."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # the abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    @contextlib.asynccontextmanager
    async def watchdog(self) -> AsyncIterator[None]:
        """Ping `WATCHDOG=1` at half of WatchdogSec while the body runs. The pings come from the
        event loop itself, so a loop that stalls (a blocking call, a deadlock) stops them and
        systemd restarts the service: that is the point."""
        if self.address is None or self.watchdog_usec <= 0:
            yield
            return
        interval = self.watchdog_usec / 2_000_000

        async def ping() -> None:
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        task = asyncio.create_task(ping(), name="sd-watchdog")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
