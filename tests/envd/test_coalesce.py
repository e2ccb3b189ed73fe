"""CoalescingTransport over a real socket pair: small writes of one loop iteration arrive in
one send, in order with large writes, and close sends what is held."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from wrenn.envd.coalesce import COALESCE_MAX_BYTES, CoalescingTransport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[CoalescingTransport, socket.socket]]:
    """A coalescing transport on one end of a socket pair; the other end read directly."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    coalescing = CoalescingTransport(transport, loop)
    try:
        yield coalescing, theirs
    finally:
        coalescing.abort()
        theirs.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return data


async def test_small_writes_of_one_iteration_leave_as_one_send(
    pair: tuple[CoalescingTransport, socket.socket],
) -> None:
    transport, peer = pair
    transport.write(b"head;")
    transport.write(b"first;")
    assert transport.get_write_buffer_size() == len(b"head;first;")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing sent yet: both are held
        peer.recv(1024)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    peer.setblocking(True)
    assert peer.recv(1024) == b"head;first;"


async def test_a_large_write_goes_after_what_is_held(
    pair: tuple[CoalescingTransport, socket.socket],
) -> None:
    transport, peer = pair
    big = b"x" * (COALESCE_MAX_BYTES * 2)
    transport.write(b"small;")
    transport.write(big)
    transport.write(b";tail")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    expected = b"small;" + big + b";tail"
    got = await asyncio.to_thread(read_exactly, peer, len(expected))
    assert got == expected


async def test_close_sends_what_is_held(pair: tuple[CoalescingTransport, socket.socket]) -> None:
    transport, peer = pair
    transport.write(b"last words")
    transport.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    got = await asyncio.to_thread(read_exactly, peer, len(b"last words"))
    assert got == b"last words"
    assert await asyncio.to_thread(peer.recv, 16) == b""  # then EOF
