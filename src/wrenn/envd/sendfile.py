"""Response bodies that leave a file with ``sendfile(2)``: a download's bytes go from the page
cache to the client's socket in the kernel, never through envd's buffers (the streaming
path reads every chunk into a ``bytes`` object and writes it out again, which cost a download
more CPU in envd than anything else on its way).

envd's HTTP protocol (``conntrack``) offers a ``FileSender`` to each request under the ASGI
scope extension ``FILE_BODY`` as ``{"send": send(fd, offset, count)}``; a response that finds
it sends its head, awaits ``send``, then ends with an empty body message. Served by anything
else (an ASGI test client) the extension is absent and the response streams.

``send`` writes on a duplicate of the connection's socket (``dupsockets``) while uvicorn's
transport is idle (its buffered bytes flushed first, nothing written meanwhile: the response
awaits ``send``). One worker thread sends the whole body (a page-cache miss must not stall
the event loop): it calls ``sendfile`` until the socket is full, waits in ``poll(2)`` for
room, and goes on. Each time the peer's acknowledgements make room costs one thread wake-up.
Going back to the loop at every full socket costs more: two hand-overs between threads and
an epoll wake-up for each ``sendfile`` call. Under TCG, those cost a guest more CPU than the
calls themselves, and more the more often the reader acknowledges.

The thread ends with the body, when the socket is shut down (the connection gone, or
aborted as a pre-snapshot zombie), or when the sending task is cancelled: the task shuts the
duplicate down and waits for the thread before closing it.
"""

from __future__ import annotations

import asyncio
import os
import select
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wrenn.envd.coalesce import CoalescingTransport
from wrenn.envd.dupsockets import DupSockets, in_thread

#: Key under the ASGI scope's ``extensions``.
FILE_BODY = "wrenn.file_body"
#: Bytes one ``sendfile`` call may move (it moves what fits in the socket's buffer).
_CALL_BYTES = 16 << 20
#: Threads that send bodies, one per body in progress: a body holds its thread for as long as
#: its reader takes, so these do not share the default executor that short calls use.
_SENDERS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="envd-sendfile")


class SendFailed(Exception):
    """The body could not be sent whole (the connection broke, or the file ended early); the
    connection has been aborted."""


class FileSender:
    """Sends file bodies on one connection (see the module docstring)."""

    def __init__(self, transport: CoalescingTransport, dups: DupSockets) -> None:
        self._transport = transport
        self._dups = dups

    def extension(self, cycle: Any) -> dict[str, Any]:
        """The scope extension for the request ``cycle`` (uvicorn's, whose Content-Length
        bookkeeping the bytes sent here count towards)."""

        async def send(fd: int, offset: int, count: int) -> None:
            await self._send(cycle, fd, offset, count)

        return {"send": send}

    async def _send(self, cycle: Any, fd: int, offset: int, count: int) -> None:
        if cycle.disconnected:
            return
        if not cycle.response_started or cycle.chunked_encoding is not False:
            raise RuntimeError("a file body needs a started response with Content-Length")
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        transport = self._transport
        try:
            with self._dups.wire() as wire:
                transport.flush()
                while transport.get_write_buffer_size():
                    await wire.writable()
                    await asyncio.sleep(0)  # the transport's own writer runs too
                await in_thread(wire, _SENDERS, _send_all, wire.fd, fd, offset, count)
                cycle.expected_content_length -= count
        except (OSError, SendFailed) as err:
            cycle.disconnected = True
            transport.abort()
            if isinstance(err, SendFailed):
                raise
            raise SendFailed(f"the connection broke: {err.strerror or err}") from err


def _send_all(sock_fd: int, fd: int, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` on the non-blocking socket ``sock_fd``,
    waiting in ``poll`` whenever it is full (see the module docstring)."""
    room = select.poll()
    room.register(sock_fd, select.POLLOUT)
    while count:
        try:
            sent = os.sendfile(sock_fd, fd, offset, min(count, _CALL_BYTES))
        except BlockingIOError:
            room.poll()
            continue
        if not sent:
            raise SendFailed(f"the file ended {count} bytes short")
        offset += sent
        count -= sent
