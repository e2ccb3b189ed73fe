"""Request bodies that go into a file with ``splice(2)``: socket to pipe to file in the kernel,
never through uvicorn's buffers or envd's (the streaming path copies every piece three times
in Python, which in a TCG guest cost an upload more than the guest's network did).

envd's HTTP protocol (``conntrack``) offers a ``BodyReceiver`` to each request under the ASGI
scope extension ``UPLOAD_BODY`` as ``{"receive": receive(fd)}``; a handler that has not read
any of the body yet awaits ``receive`` with the destination file's descriptor, and the body
(``Content-Length`` bytes, not chunked) ends up written at the file's offset. Served by
anything else (an ASGI test client) the extension is absent and the handler streams.

How: uvicorn's reading is paused, the bytes it already parsed are written first, then the
rest is spliced from a duplicate of the connection's socket (``dupsockets``) through a pipe
of the process's pool (``core.http1.wire.pipes``), each batch on a worker thread (a file write
can block); waiting for data happens on the loop. uvicorn's parser never sees those bytes, so
the connection cannot carry another request: the response says ``Connection: close``. That is
why handlers take this path for large bodies only. A connection that ends under an upload
(the client gone, or a pre-snapshot zombie aborted after a restore) ends it with
``UploadCut``. A cancelled upload (envd stopping past its grace) waits for the batch in flight
before the pipe, the duplicate and the file close (``dupsockets.in_thread``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from wrenn.core.http1.wire import PIPE_BYTES, pipes
from wrenn.envd.coalesce import CoalescingTransport
from wrenn.envd.dupsockets import DupSockets, in_thread
from wrenn.envd.filesystem.transfer import write_all

#: Key under the ASGI scope's ``extensions``.
UPLOAD_BODY = "wrenn.upload_body"
_SPLICE_IN = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class UploadCut(Exception):
    """The connection ended before the whole body arrived."""


def content_length(scope: Mapping[str, Any]) -> int | None:
    """The request's ``Content-Length`` when it has one and is not chunked."""
    length = None
    for key, value in scope.get("headers", ()):
        if key == b"transfer-encoding":
            return None
        if key == b"content-length" and value.isdigit():
            length = int(value)
    return length


def _splice_batch(sock: int, pipe: tuple[int, int], fd: int, want: int) -> tuple[int, bool]:
    """Move what the socket has (up to ``want`` bytes) into ``fd``; (bytes moved, whether the
    socket reached its end)."""
    moved = 0
    while moved < want:
        try:
            got = os.splice(sock, pipe[1], min(want - moved, PIPE_BYTES), flags=_SPLICE_IN)
        except BlockingIOError:
            break
        if not got:
            return moved, True
        while got:
            put = os.splice(pipe[0], fd, got, flags=os.SPLICE_F_MOVE)
            got -= put
            moved += put
    return moved, False


class BodyReceiver:
    """Receives request bodies into files on one connection (see the module docstring)."""

    def __init__(self, protocol: Any, transport: CoalescingTransport, dups: DupSockets) -> None:
        self._protocol = protocol
        self._transport = transport
        self._dups = dups
        #: The cycle whose body was taken: what uvicorn's parser still reports of it is
        #: dropped (``owns``).
        self.taken: Any = None

    def extension(self, cycle: Any) -> dict[str, Any]:
        async def receive(fd: int) -> None:
            await self._receive(cycle, fd)

        return {"receive": receive}

    def owns(self, cycle: Any) -> bool:
        return cycle is not None and cycle is self.taken

    async def _receive(self, cycle: Any, fd: int) -> None:
        length = content_length(cycle.scope)
        if length is None:
            raise RuntimeError("a spliced body needs a Content-Length")
        if cycle.disconnected:
            raise UploadCut("the client went away")
        transport = self._transport
        if cycle.waiting_for_100_continue and not transport.is_closing():
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            transport.flush()
            cycle.waiting_for_100_continue = False
        self._protocol.flow.pause_reading()
        self.taken = cycle
        cycle.keep_alive = False  # the parser would read the next bytes as this body's
        held, cycle.body = bytes(cycle.body), bytearray()
        if held:
            await in_thread(None, None, write_all, fd, held)
        remaining = length - len(held)
        if not remaining:
            return
        if not cycle.more_body:
            raise RuntimeError("the parser ended the body before its length")
        pipe = pipes.take()
        emptied = False
        try:
            with self._dups.wire() as wire:
                while remaining:
                    moved, ended = await in_thread(
                        wire, None, _splice_batch, wire.fd, pipe, fd, remaining
                    )
                    remaining -= moved
                    if ended and remaining:
                        raise UploadCut(f"the body ended {remaining} bytes short")
                    if remaining and not moved:
                        await wire.readable()
            emptied = True
        except ConnectionError as err:
            raise UploadCut(f"the connection broke: {err.strerror or err}") from err
        finally:
            pipes.give(pipe, empty=emptied)
