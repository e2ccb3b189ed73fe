"""Two wires in a row for relay tests: writer → src wire → (relay) → dst wire → reader, each
hop a connected pair of sockets the test chooses (Unix socket pairs, or TCP where the kernel
needs it)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable

from wrenn.core.http1.wire import Wire

Pair = Callable[[], tuple[socket.socket, socket.socket]]


@contextlib.asynccontextmanager
async def wire_chain(pair: Pair) -> AsyncIterator[tuple[socket.socket, Wire, Wire, socket.socket]]:
    """(writer, src, dst, reader); ``pair`` makes each hop (the test's end first)."""
    writer, upstream = pair()
    reader, downstream = pair()
    for sock in (writer, reader):
        sock.setblocking(False)
    src, dst = Wire(upstream), Wire(downstream)
    try:
        yield writer, src, dst, reader
    finally:
        for sock in (writer, reader):
            sock.close()
        src.close()
        dst.close()
