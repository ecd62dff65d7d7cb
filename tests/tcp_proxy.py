"""A loopback TCP proxy that can throttle and cut connections, for fault tests."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import threading
import time

_SIOCOUTQ = 0x5411  # linux/sockios.h: bytes in a socket's send queue (not yet acked)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `rate` caps downstream bytes/s (0: unlimited)."""

    def __init__(self, target_port: int, rate: int = 0, chunk: int = 16 * 1024) -> None:
        self.target_port = target_port
        self.rate = rate
        self.chunk = chunk
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._cut_points: list[int] = []
        self._clients: set[socket.socket] = set()
        self.bytes_down = 0
        self.undelivered = 0  # of bytes_down: still in our send queue when a cut dropped them
        self.accepted = 0
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                self._clients.add(client)
                self.accepted += 1
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                dst.sendall(data)
                if down:
                    with self._lock:  # several connections may count at once
                        self.bytes_down += len(data)
                        due = bool(self._cut_points) and self.bytes_down >= self._cut_points[0]
                        if due:
                            self._cut_points.pop(0)
                    if due:
                        self.cut()
                        return
                    if self.rate:
                        time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut_at(self, offsets: list[int]) -> None:
        """Cut every connection each time `bytes_down` passes one of `offsets`.

        Checked after each forwarded piece (at most `chunk` bytes), so a cut lands within one
        piece of its offset: mid-message, wherever that is in the stream.
        """
        with self._lock:
            self._cut_points = sorted(offsets)

    def cut(self) -> None:
        """Drop every open connection (new ones are still accepted)."""
        with self._lock:
            conns, self._conns = self._conns, []
            clients, self._clients = self._clients, set()
            self.cuts += 1
            # sendall() returns once bytes are in the kernel's send queue; what is still queued
            # when the link drops never reached the client, so it was not transferred.
            for s in clients:
                with contextlib.suppress(OSError):
                    raw = fcntl.ioctl(s.fileno(), _SIOCOUTQ, b"\0\0\0\0")
                    self.undelivered += struct.unpack("i", raw)[0]
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
