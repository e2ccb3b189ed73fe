"""Connections to upstream servers, kept alive and reused per address.

Invariants:
- a connection comes back only after a response was read to its end, both sides allowed
  keep-alive and nothing arrived past it;
- an idle connection is closed after ``idle_s`` (uvicorn, which the agent and envd run on,
  drops its own side after 5 s) and is checked for a close by the peer before reuse;
- every connection made runs the ``on_open`` hook of the request that made it, and its
  ``on_close`` callbacks when it closes however it closes (the agent counts guest connections
  that way, to end them all before a pause).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from wrenn.core.http1.wire import Wire

Address = tuple[str, int]


class ConnectError(Exception):
    """No connection could be made; ``refused``: nothing listens there."""

    def __init__(self, message: str, *, refused: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out


class Upstream(Wire):
    """A connection to one upstream address."""

    def __init__(self, sock: socket.socket, address: Address) -> None:
        super().__init__(sock)
        self.address = address
        #: Whether it served a request before (a failure then may be a stale keep-alive).
        self.reused = False
        self._on_close: list[Callable[[], None]] = []
        self._expiry: asyncio.TimerHandle | None = None

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.closed:
            return
        super().close()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()


class Pool:
    def __init__(self, *, idle_s: float = 4.0, max_idle_per_address: int = 64) -> None:
        self._idle_s = idle_s
        self._max_idle = max_idle_per_address
        self._idle: dict[Address, list[Upstream]] = {}

    def take(self, address: Address) -> Upstream | None:
        """An idle connection to ``address`` that still looks usable."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn._expiry is not None:
                conn._expiry.cancel()
                conn._expiry = None
            if not conn.at_eof():
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(
        self,
        address: Address,
        *,
        timeout_s: float,
        on_open: Callable[[Upstream], None] | None = None,
    ) -> Upstream:
        """A new connection to ``address``."""
        loop = asyncio.get_running_loop()
        host, port = address
        try:
            async with asyncio.timeout(timeout_s):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, kind, proto, _, sockaddr = infos[0]
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, sockaddr)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError as err:
            raise ConnectError(f"connect timed out after {timeout_s} s", timed_out=True) from err
        except ConnectionRefusedError as err:
            raise ConnectError("connect failed: connection refused", refused=True) from err
        except OSError as err:
            raise ConnectError(f"connect failed: {err.strerror or type(err).__name__}") from err
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Upstream(sock, address)
        if on_open is not None:
            try:
                on_open(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def put(self, conn: Upstream) -> None:
        """Keep ``conn`` for the next request to its address."""
        idle = self._idle.setdefault(conn.address, [])
        if conn.closed or len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)
        conn._expiry = asyncio.get_running_loop().call_later(self._idle_s, self._expire, conn)

    def _expire(self, conn: Upstream) -> None:
        conn._expiry = None
        idle = self._idle.get(conn.address)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.address]
        conn.close()

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
