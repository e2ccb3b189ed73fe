"""Duplicates of one connection's socket, each driven directly (``core.http1.wire.Wire``) for
one body while uvicorn's transport leaves the socket alone: a download sent with sendfile
(``sendfile``), an upload spliced into its file (``splicebody``).

When the connection ends (its peer gone, or closed here: a pre-snapshot zombie aborted after a
restore) every duplicate is shut down, so a body in progress ends instead of holding the
connection open. A duplicate is closed only by the task that drives it, once its last
worker-thread call has returned: its descriptor number is never reused under a call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar, TypeVarTuple

from wrenn.core.http1.wire import Wire

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class DupSockets:
    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._wires: set[Wire] = set()

    @contextlib.contextmanager
    def wire(self) -> Iterator[Wire]:
        """A duplicate of the connection's socket for the duration of the block."""
        raw = self._transport.get_extra_info("socket")
        wire = Wire(socket.socket(fileno=os.dup(raw.fileno())))
        self._wires.add(wire)
        try:
            yield wire
        finally:
            self._wires.discard(wire)
            wire.close()

    def connection_lost(self) -> None:
        for wire in self._wires:
            with contextlib.suppress(OSError):
                wire.sock.shutdown(socket.SHUT_RDWR)


async def in_thread(
    wire: Wire | None, executor: Executor | None, call: Callable[[*Ts], T], *args: *Ts
) -> T:
    """``call(*args)`` on a worker thread of ``executor`` (the loop's default: ``None``), a
    call that uses ``wire`` (if any) and other descriptors its caller closes. When the
    awaiting task is cancelled, ``wire`` is shut down (which wakes a call waiting on it) and
    the call is waited for before the cancellation goes on: whoever closes those descriptors
    never closes them under the call."""
    future = asyncio.get_running_loop().run_in_executor(executor, call, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if wire is not None:
            with contextlib.suppress(OSError):
                wire.sock.shutdown(socket.SHUT_RDWR)
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: the task's own cancellation is what counts
        raise
