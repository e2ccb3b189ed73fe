"""core.http1 over real socket pairs: heads and their framing, bodies moved in every framing
however their bytes are split on the way (spliced, copied, and in batches), broken framing
refused, a wire closed under a waiting relay, and the keep-alive pool."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest

from tests.unit.wires import wire_chain
from wrenn.core.http1 import wire
from wrenn.core.http1.body import Malformed, relay
from wrenn.core.http1.head import (
    MAX_HEAD_BYTES,
    Framing,
    HeadError,
    head_end,
    parse_request,
    parse_response,
)
from wrenn.core.http1.pool import Pool
from wrenn.core.http1.wire import Broken, Truncated, Wire


def test_request_framing() -> None:
    head = parse_request(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n")
    assert (head.method, head.target, head.path) == (b"POST", b"/a?b=1", b"/a")
    assert (head.framing, head.length, head.keep_alive, head.http_11) == (
        Framing.LENGTH,
        12,
        True,
        True,
    )
    assert head.header(b"host") == b"x"
    head = parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert head.framing is Framing.CHUNKED
    head = parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert (head.framing, head.keep_alive) == (Framing.NONE, False)
    head = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert (head.http_11, head.keep_alive) == (False, False)
    head = parse_request(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert head.upgrade
    head = parse_request(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-Continue\r\n\r\n")
    assert head.expects_continue


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ],
)
def test_requests_that_invite_smuggling_are_refused(raw: bytes) -> None:
    with pytest.raises(HeadError) as refused:
        parse_request(raw)
    assert refused.value.status == 400


def test_head_end_and_its_limit() -> None:
    assert head_end(bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n")) == -1
    assert head_end(bytearray(b"GET / HTTP/1.1\r\n\r\nbody")) == 18
    with pytest.raises(HeadError) as refused:
        head_end(bytearray(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES))
    assert refused.value.status == 431


def test_response_framing() -> None:
    ok = b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 3\r\n\r\n"
    response = parse_response(ok, request_method=b"GET")
    assert (response.status, response.reason, response.framing, response.length) == (
        200,
        b"Fine Thanks",
        Framing.LENGTH,
        3,
    )
    assert parse_response(ok, request_method=b"HEAD").framing is Framing.NONE
    for status in (b"204 No Content", b"304 Not Modified", b"100 Continue"):
        raw = b"HTTP/1.1 " + status + b"\r\n\r\n"
        assert parse_response(raw, request_method=b"GET").framing is Framing.NONE
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_response(raw, request_method=b"GET").framing is Framing.CHUNKED
    closing = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", request_method=b"GET")
    assert (closing.framing, closing.keep_alive) == (Framing.UNTIL_CLOSE, False)


async def _send_in_pieces(sock: socket.socket, data: bytes, seed: int) -> None:
    """Send ``data`` cut at random places, with pauses, so reads see every split."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 7, 100, 4096, 70_000, 300_000])
        await loop.sock_sendall(sock, data[pos : pos + step])
        pos += step
        if rng.random() < 0.3:
            await asyncio.sleep(0)


async def _receive(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        data = await loop.sock_recv(sock, 1 << 20)
        if not data:
            break
        out += data
    return bytes(out)


def _chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    out = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    return out + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("spliced", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("seed", range(4))
async def test_chunked_bodies_pass_verbatim_however_they_arrive(seed: int, spliced: bool) -> None:
    pieces = [os.urandom(n) for n in (1, 17, 65_535, 65_536, 200_000, 1 << 20, 3)]
    body = _chunked(pieces, trailer=b"x-checksum: abc\r\n")
    async with wire_chain(socket.socketpair) as (writer, src, dst, reader):
        dst.local_peer = not spliced
        sending = asyncio.ensure_future(_send_in_pieces(writer, body + b"NEXT", seed))
        receiving = asyncio.ensure_future(_receive(reader, len(body)))
        await relay(src, dst, Framing.CHUNKED, 0)
        assert await receiving == body
        await sending
        while len(src.buffer) < 4 and await src.fill():
            pass
        assert bytes(src.buffer) == b"NEXT"  # the next message stays for its reader


@pytest.mark.parametrize("spliced", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("size", [0, 1, 1000, 64 * 1024, 3 * 2**20 + 1])
async def test_length_bodies_are_moved_exactly(size: int, spliced: bool) -> None:
    body = os.urandom(size)
    async with wire_chain(socket.socketpair) as (writer, src, dst, reader):
        # Spliced for a peer elsewhere, copied through a buffer for one on this host.
        dst.local_peer = not spliced
        sending = asyncio.ensure_future(_send_in_pieces(writer, body + b"NEXT", size))
        receiving = asyncio.ensure_future(_receive(reader, size))
        await relay(src, dst, Framing.LENGTH, size)
        assert await receiving == body
        await sending


async def test_a_body_until_close_ends_with_the_connection() -> None:
    body = os.urandom(2 * 2**20)
    async with wire_chain(socket.socketpair) as (writer, src, dst, reader):

        async def send_and_close() -> None:
            await _send_in_pieces(writer, body, 7)
            writer.shutdown(socket.SHUT_WR)

        sending = asyncio.ensure_future(send_and_close())
        receiving = asyncio.ensure_future(_receive(reader, len(body)))
        await relay(src, dst, Framing.UNTIL_CLOSE, 0)
        assert await receiving == body
        await sending


@pytest.mark.parametrize("reader_here", [True, False], ids=["reader-here", "reader-elsewhere"])
@pytest.mark.parametrize("seed", range(2))
async def test_a_long_response_from_a_peer_elsewhere_moves_in_batches(
    seed: int, reader_here: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = wire.LONG_BODY_BYTES + 3 * 2**20 + 1
    body = os.urandom(size)
    waits: list[float] = []
    sleep = asyncio.sleep

    async def noted(delay: float) -> None:
        waits.append(delay)
        await sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", noted)
    async with wire_chain(socket.socketpair) as (writer, src, dst, reader):
        src.local_peer, dst.local_peer = False, reader_here
        sending = asyncio.ensure_future(_send_in_pieces(writer, body + b"NEXT", seed))
        receiving = asyncio.ensure_future(_receive(reader, size))
        await relay(src, dst, Framing.LENGTH, size, last=True)
        assert await receiving == body
        await sending
        while len(src.buffer) < 4 and await src.fill():
            pass
        assert bytes(src.buffer) == b"NEXT"  # never read past the body
    assert wire.BATCH_S in waits  # it waited for a batch after emptying the queue


async def test_a_long_response_cut_short_in_batches_is_truncated() -> None:
    async with wire_chain(socket.socketpair) as (writer, src, dst, reader):
        src.local_peer = False
        sent = os.urandom(2**20)

        async def send_and_close() -> None:
            await asyncio.get_running_loop().sock_sendall(writer, sent)
            writer.shutdown(socket.SHUT_WR)

        sending = asyncio.ensure_future(send_and_close())
        receiving = asyncio.ensure_future(_receive(reader, len(sent)))
        with pytest.raises(Truncated) as cut:
            await relay(src, dst, Framing.LENGTH, wire.LONG_BODY_BYTES, last=True)
        assert cut.value.wire is src
        assert await receiving == sent  # what arrived was passed on
        await sending


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nab\r\n0\r\n\r\n", b"2\r\nabcd\r\n0\r\n\r\n", b" 2\r\nab\r\n0\r\n\r\n", b"0x2\r\n"],
)
async def test_broken_chunk_framing_is_refused(body: bytes) -> None:
    async with wire_chain(socket.socketpair) as (writer, src, dst, _):
        await asyncio.get_running_loop().sock_sendall(writer, body)
        with pytest.raises(Malformed):
            await relay(src, dst, Framing.CHUNKED, 0)


@pytest.mark.parametrize(
    ("framing", "body"),
    [(Framing.LENGTH, b"short"), (Framing.CHUNKED, b"10\r\nshort")],
)
async def test_a_body_cut_short_is_truncated(framing: Framing, body: bytes) -> None:
    async with wire_chain(socket.socketpair) as (writer, src, dst, _):
        await asyncio.get_running_loop().sock_sendall(writer, body)
        writer.shutdown(socket.SHUT_WR)
        with pytest.raises(Truncated) as cut:
            await relay(src, dst, framing, 100_000)
        assert cut.value.wire is src


async def test_closing_a_wire_ends_a_relay_waiting_on_it() -> None:
    async with wire_chain(socket.socketpair) as (_, src, dst, _reader):
        moving = asyncio.ensure_future(relay(src, dst, Framing.LENGTH, 1 << 20))
        await asyncio.sleep(0.01)
        assert not moving.done()
        src.close()
        with pytest.raises(Broken) as broken:
            await moving
        assert broken.value.wire is src


async def test_a_loopback_peer_is_on_this_host() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        with socket.create_connection(listener.getsockname()) as sock:
            assert Wire(sock.dup()).local_peer
        a, b = socket.socketpair()
        with a, b:
            assert Wire(b.dup()).local_peer
    finally:
        listener.close()


async def test_the_pool_reuses_live_connections_only() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    address = listener.getsockname()
    loop = asyncio.get_running_loop()
    pool = Pool(idle_s=0.2)
    closed: list[str] = []
    try:
        conn = await pool.connect(
            address, timeout_s=5, on_open=lambda c: c.on_close(lambda: closed.append("a"))
        )
        peer, _ = await loop.sock_accept(listener)
        pool.put(conn)
        assert pool.take(address) is conn and conn.reused
        pool.put(conn)
        peer.close()  # the server drops its side while the connection is idle
        await asyncio.sleep(0.05)
        assert pool.take(address) is None
        assert conn.closed and closed == ["a"]

        second = await pool.connect(address, timeout_s=5)
        peer, _ = await loop.sock_accept(listener)
        pool.put(second)
        await asyncio.sleep(0.4)  # idle past idle_s: closed, not kept
        assert second.closed and pool.take(address) is None
        peer.close()
    finally:
        pool.close()
        listener.close()
