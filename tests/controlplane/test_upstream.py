"""The ASGI path's HTTP/1.1 client (``controlplane.upstream``) against a real HTTP server on a
loopback socket: a connection whose response was read to the end goes back to the pool and
carries the next request, one whose response says ``Connection: close`` (or whose body was
left unread) does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from wrenn.controlplane.upstream import Origin, UpstreamPool

BODY = b"x" * 300_000  # more than one read of the client's


class Server:
    """Answers every request on a connection with ``BODY``; ``close`` in the target: with
    ``Connection: close``, then closes. Counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                method, target, _ = head.split(b" ", 2)
                close = b"close" in target
                extra = b"connection: close\r\n" if close else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (len(BODY), extra)
                )
                if method != b"HEAD":
                    writer.write(BODY)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Origin, UpstreamPool]]:
    server = Server()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_timeout_s=5)
    try:
        yield server, Origin.parse(f"http://127.0.0.1:{port}"), pool
    finally:
        await pool.aclose()
        listening.close()
        await listening.wait_closed()


async def _get(pool: UpstreamPool, origin: Origin, target: bytes, method: str = "GET") -> bytes:
    response = await pool.request(origin, method, target, [], None)
    assert response.status == 200
    return b"".join([piece async for piece in response.body()])


async def test_a_connection_read_to_the_end_carries_the_next_requests(
    served: tuple[Server, Origin, UpstreamPool],
) -> None:
    server, origin, pool = served
    for _ in range(3):
        assert await _get(pool, origin, b"/a") == BODY
    assert await _get(pool, origin, b"/head", method="HEAD") == b""
    assert await _get(pool, origin, b"/a") == BODY
    assert server.accepted == 1


async def test_connection_close_and_an_unread_body_are_not_reused(
    served: tuple[Server, Origin, UpstreamPool],
) -> None:
    server, origin, pool = served
    assert await _get(pool, origin, b"/close") == BODY
    assert await _get(pool, origin, b"/a") == BODY
    assert server.accepted == 2
    response = await pool.request(origin, "GET", b"/a", [], None)
    response.close()  # the body left unread: the connection cannot carry another request
    assert await _get(pool, origin, b"/a") == BODY
    assert server.accepted == 3
