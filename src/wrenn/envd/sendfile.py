"""Response bodies that leave a file with ``sendfile(2)``: a download's bytes go from the page
cache to the client's socket in the kernel, never through envd's buffers (the streaming
path reads every chunk into a ``bytes`` object and writes it out again, which cost a download
more CPU in envd than anything else on its way).

envd's HTTP protocol (``conntrack``) offers a ``FileSender`` to each request under the ASGI
scope extension ``FILE_BODY`` as ``{"send": send(fd, offset, count)}``; a response that finds
it sends its head, awaits ``send``, then ends with an empty body message. Served by anything
else (an ASGI test client) the extension is absent and the response streams.

``send`` writes on a duplicate of the connection's socket while uvicorn's transport is idle
(its buffered bytes flushed first, nothing written meanwhile: the response awaits ``send``).
Each ``sendfile`` call runs on a worker thread, as the streaming path's reads do (a page-cache
miss must not stall the event loop); waiting for room in the socket happens on the loop. When
the connection is closed underneath (the client went away; after a restore, a pre-snapshot
connection aborted), the duplicate is shut down so the send ends instead of holding the
connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from wrenn.envd.coalesce import CoalescingTransport

#: Key under the ASGI scope's ``extensions``.
FILE_BODY = "wrenn.file_body"
#: Bytes one ``sendfile`` call may move (it moves what fits in the socket's buffer).
_CALL_BYTES = 16 << 20


class SendFailed(Exception):
    """The body could not be sent whole (the connection broke, or the file ended early); the
    connection has been aborted."""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FileSender:
    """Sends file bodies on one connection (see the module docstring)."""

    def __init__(self, transport: CoalescingTransport) -> None:
        self._transport = transport
        self._sockets: set[socket.socket] = set()

    def extension(self, cycle: Any) -> dict[str, Any]:
        """The scope extension for the request ``cycle`` (uvicorn's, whose Content-Length
        bookkeeping the bytes sent here count towards)."""

        async def send(fd: int, offset: int, count: int) -> None:
            await self._send(cycle, fd, offset, count)

        return {"send": send}

    def connection_lost(self) -> None:
        """End sends in progress: their peer is gone, or the connection was closed here."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def _send(self, cycle: Any, fd: int, offset: int, count: int) -> None:
        if cycle.disconnected:
            return
        if not cycle.response_started or cycle.chunked_encoding is not False:
            raise RuntimeError("a file body needs a started response with Content-Length")
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        loop = asyncio.get_running_loop()
        transport = self._transport
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._sockets.add(sock)
        try:
            transport.flush()
            while transport.get_write_buffer_size():
                await _writable(loop, sock)
                await asyncio.sleep(0)  # the transport's own writer runs too
            while count:
                try:
                    sent = await loop.run_in_executor(
                        None, os.sendfile, sock.fileno(), fd, offset, min(count, _CALL_BYTES)
                    )
                except BlockingIOError:
                    await _writable(loop, sock)
                    continue
                if not sent:
                    raise SendFailed(f"the file ended {count} bytes short")
                offset += sent
                count -= sent
                cycle.expected_content_length -= sent
        except (OSError, SendFailed) as err:
            cycle.disconnected = True
            transport.abort()
            if isinstance(err, SendFailed):
                raise
            raise SendFailed(f"the connection broke: {err.strerror or err}") from err
        finally:
            self._sockets.discard(sock)
            sock.close()


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` has room (or has failed: the next write says how)."""
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(sock.fileno())
