"""The agent's long-lived connections into one guest that no HTTP client pool owns: WebSockets
relayed by the forwarding path. Before a pause (and when the VM stops) they are closed while
the guest still runs, so both ends see a close handshake instead of a connection that hangs
across the snapshot: the restored guest comes back in another slot, at another address, and
nothing would ever answer on the old one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

#: WebSocket close code "going away": the sandbox is pausing or stopping.
GOING_AWAY = 1001


class Closable(Protocol):
    async def close(self, code: int = ..., reason: str = ...) -> None: ...


class GuestConnections:
    def __init__(self) -> None:
        self._open: set[Closable] = set()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, conn: Closable) -> Iterator[None]:
        """Count ``conn`` as open for the duration of the block."""
        self._open.add(conn)
        try:
            yield
        finally:
            self._open.discard(conn)

    async def close_all(self, reason: str) -> int:
        """Close every tracked connection (each bounded by its own close timeout); how many."""
        conns = list(self._open)
        self._open.clear()
        await asyncio.gather(*(c.close(GOING_AWAY, reason) for c in conns), return_exceptions=True)
        return len(conns)
