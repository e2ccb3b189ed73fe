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
awaits ``send``). Each ``sendfile`` call runs on a worker thread, as the streaming path's
reads do (a page-cache miss must not stall the event loop); waiting for room in the socket
happens on the loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from wrenn.envd.coalesce import CoalescingTransport
from wrenn.envd.dupsockets import DupSockets

#: Key under the ASGI scope's ``extensions``.
FILE_BODY = "wrenn.file_body"
#: Bytes one ``sendfile`` call may move (it moves what fits in the socket's buffer).
_CALL_BYTES = 16 << 20


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
        loop = asyncio.get_running_loop()
        transport = self._transport
        try:
            with self._dups.wire() as wire:
                transport.flush()
                while transport.get_write_buffer_size():
                    await wire.writable()
                    await asyncio.sleep(0)  # the transport's own writer runs too
                while count:
                    try:
                        sent = await loop.run_in_executor(
                            None, os.sendfile, wire.fd, fd, offset, min(count, _CALL_BYTES)
                        )
                    except BlockingIOError:
                        await wire.writable()
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
