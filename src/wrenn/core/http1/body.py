"""Moving one message body from one wire to another, as framed by its head: a length, chunks,
or the rest of the connection.

A chunked body is passed on verbatim (sizes, extensions and trailers as sent) while its framing
is followed, so the relay knows where it ends: chunk data past ``wire.PUMP_MIN_BYTES`` is
pumped socket to socket (``wire.move``), the rest passed on from the read buffer. Whatever
has arrived is passed on before waiting for more, so a stream (Connect server streams, process
output) flows unbuffered.
"""

from __future__ import annotations

import re

from wrenn.core.http1.head import Framing
from wrenn.core.http1.wire import PUMP_MIN_BYTES, READ_BYTES, Broken, Truncated, Wire, move

#: Longest chunk size line (with extensions) or trailer section accepted.
_MAX_LINE_BYTES = 16 * 1024
_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[^\r\n]*)?")


class Malformed(Broken):
    """The body's framing is broken: the connection cannot be trusted past it."""


async def relay(
    src: Wire, dst: Wire | None, framing: Framing, length: int, *, last: bool = False
) -> None:
    """Move (or, without ``dst``, read and drop) one body of ``src``. Bytes past its end stay
    in ``src.buffer``. ``last``: nothing follows the body on ``src`` until ``dst``'s peer asks
    for more (a response; see ``wire.move``)."""
    if framing is Framing.NONE:
        return
    if framing is Framing.CHUNKED:
        await _chunked(src, dst)
    elif dst is not None:
        await move(src, dst, length if framing is Framing.LENGTH else None, last=last)
    else:
        await _drop(src, length if framing is Framing.LENGTH else None)


async def _drop(src: Wire, n: int | None) -> None:
    while n is None or n:
        if not src.buffer and not await src.fill(READ_BYTES if n is None else min(n, READ_BYTES)):
            if n is None:
                return
            raise Truncated(src, f"ended {n} bytes short")
        take = len(src.buffer) if n is None else min(n, len(src.buffer))
        del src.buffer[:take]
        if n is not None:
            n -= take


class _Chunks:
    """Where a chunked body is: ``pos`` bytes of ``src.buffer`` are checked and not yet
    passed on."""

    def __init__(self, src: Wire, dst: Wire | None) -> None:
        self.src, self.dst = src, dst
        self.pos = 0

    async def flush(self) -> None:
        if self.dst is not None:
            await self.src.send_buffered(self.dst, self.pos)
        else:
            del self.src.buffer[: self.pos]
        self.pos = 0

    async def more(self, want: int = _MAX_LINE_BYTES) -> None:
        """Pass on what is checked, then wait for more of the body."""
        await self.flush()
        if not await self.src.fill(want):
            raise Truncated(self.src, "the chunked body ended early")

    async def line(self) -> bytes:
        """The next line (without its CRLF), once it has arrived whole."""
        buffer = self.src.buffer
        while True:
            end = buffer.find(b"\r\n", self.pos, self.pos + _MAX_LINE_BYTES + 2)
            if end >= 0:
                line = bytes(buffer[self.pos : end])
                self.pos = end + 2
                return line
            if len(buffer) - self.pos > _MAX_LINE_BYTES:
                raise Malformed(self.src, "chunk size line or trailer too long")
            await self.more()

    async def data(self, size: int) -> None:
        """Pass ``size`` bytes of chunk data and the CRLF after it."""
        buffer = self.src.buffer
        while size:
            have = min(size, len(buffer) - self.pos)
            self.pos += have
            size -= have
            if not size:
                break
            await self.flush()
            if size >= PUMP_MIN_BYTES and self.dst is not None:
                await move(self.src, self.dst, size)
                break
            if not await self.src.fill(min(size + _MAX_LINE_BYTES, READ_BYTES)):
                raise Truncated(self.src, "the chunked body ended early")
        while len(buffer) - self.pos < 2:
            await self.more()
        if buffer[self.pos : self.pos + 2] != b"\r\n":
            raise Malformed(self.src, "chunk data not followed by CRLF")
        self.pos += 2


async def _chunked(src: Wire, dst: Wire | None) -> None:
    chunks = _Chunks(src, dst)
    while True:
        match = _SIZE.fullmatch(await chunks.line())
        if match is None:
            raise Malformed(src, "bad chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            break
        await chunks.data(size)
    trailers = 0
    while line := await chunks.line():
        trailers += len(line)
        if trailers > _MAX_LINE_BYTES:
            raise Malformed(src, "trailers too long")
    await chunks.flush()
