"""Response bodies redirected in the kernel (core.http1.sockmap, through ``wire.move``) over
real TCP connections and the real BPF program: the bytes arrive exact and in order however
they were split and whatever was read before, a reader that falls behind takes the rest from
the relay, a peer that sends past its body or stops short is refused, a reader that leaves
ends the redirect, and both connections go on as plain sockets afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import subprocess
import sys

import pytest

from tests.unit.wires import wire_chain
from wrenn.core.http1 import sockmap, wire
from wrenn.core.http1.wire import Broken, Truncated, Wire, move

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")


@pytest.fixture(autouse=True)
def _redirecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.redirecting, "enabled", True)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP connection over loopback (a sockmap takes TCP sockets only): (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


async def _send(
    sock: socket.socket, data: bytes, piece: int = 1 << 20, *, pause_s: float = 0.0
) -> None:
    loop = asyncio.get_running_loop()
    for at in range(0, len(data), piece):
        await loop.sock_sendall(sock, data[at : at + piece])
        if pause_s:
            await asyncio.sleep(pause_s)


async def _read(
    sock: socket.socket, n: int, *, pause_s: float = 0.0, piece: int = 1 << 20
) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        data = await loop.sock_recv(sock, min(piece, n - len(out)))
        if not data:
            break
        out += data
        if pause_s:
            await asyncio.sleep(pause_s)
    return bytes(out)


def _redirected() -> tuple[int, int, int]:
    return wire.redirecting.bytes, wire.redirecting.bodies, wire.redirecting.spills


async def _under_way(
    writer: socket.socket, src: Wire, dst: Wire, body: bytes, *, pause_s: float = 0.0
) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
    """A response body's relay started with 100 kB of it there already (read by the relay),
    the rest sent once the redirect is in place: the relay and the sending."""
    await _send(writer, body[:100_000])
    moving = asyncio.ensure_future(move(src, dst, len(body), last=True))
    await asyncio.sleep(0.02)
    sending = asyncio.ensure_future(_send(writer, body[100_000:], pause_s=pause_s))
    return moving, sending


@pytest.mark.parametrize("size", [5 << 20, 8 * 2**20 + 1, 64 * 2**20])
@pytest.mark.parametrize("read_first", [0, 1000, 300_000])
async def test_a_response_body_is_redirected_exactly(size: int, read_first: int) -> None:
    """Whatever the relay read before (a head and the start of the body, partly through a
    segment), the kernel moves the rest, in order; then both connections carry the next
    exchange as plain sockets."""
    body = os.urandom(size)
    early = read_first + 100_000  # there before the redirect starts: read by the relay
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        before = _redirected()
        await _send(writer, body[:early])
        while len(src.buffer) < read_first:
            assert await src.fill(read_first - len(src.buffer))
        receiving = asyncio.ensure_future(_read(reader, size))
        moving = asyncio.ensure_future(move(src, dst, size, last=True))
        await asyncio.sleep(0.02)
        await _send(writer, body[early:])
        await moving
        received = await receiving
        assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
        moved, bodies, _ = _redirected()
        assert bodies == before[1] + 1
        assert moved > before[0]  # what came later went (at least in part) through the kernel
        # Both are plain sockets again: the next message goes through the process.
        await _send(writer, b"NEXT")
        while len(src.buffer) < 4:
            assert await src.fill()
        assert bytes(src.buffer) == b"NEXT"
        await dst.send(b"AFTER")
        assert await _read(reader, 5) == b"AFTER"


async def test_a_reader_that_falls_behind_gets_the_rest_from_the_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel holds at most a window of the body for a slow reader: past it, the rest
    spills back to the relay, which copies it after what was redirected."""
    monkeypatch.setattr(wire, "REDIRECT_WINDOW_BYTES", 1 << 20)
    size = 16 * 2**20
    body = os.urandom(size)
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        before = _redirected()
        moving, sending = await _under_way(writer, src, dst, body)
        receiving = asyncio.ensure_future(_read(reader, size, pause_s=0.01, piece=256 * 1024))
        await moving
        received = await receiving
        await sending
        assert received == body
        moved, _, spills = _redirected()
        assert spills == before[2] + 1
        assert 0 < moved - before[0] < size


async def test_after_a_spill_the_kernel_takes_over_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that stalls once: what spilled meanwhile goes through the relay, then the
    redirect resumes, and most of the body still moves in the kernel. (The writer sends at
    a guest's pace, not faster than the relay copies: past a spill the kernel takes over
    again once the relay has caught up.)"""
    monkeypatch.setattr(wire, "REDIRECT_WINDOW_BYTES", 1 << 20)
    size = 64 * 2**20
    body = os.urandom(size)
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        before = _redirected()
        moving, sending = await _under_way(writer, src, dst, body, pause_s=0.004)
        first = await _read(reader, 2 << 20)
        await asyncio.sleep(0.3)  # the stall: the window fills, the rest spills
        rest = await _read(reader, size - len(first))
        await moving
        await sending
        assert first + rest == body
        moved, _, spills = _redirected()
        assert spills == before[2] + 1
        assert moved - before[0] > size // 2


async def test_a_peer_sending_past_its_body_is_refused() -> None:
    """Bytes past the body never reach the reader: the relay refuses the connection."""
    size = 6 * 2**20
    body = os.urandom(size)
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        receiving = asyncio.ensure_future(_read(reader, size + 100))
        sending = asyncio.ensure_future(_send(writer, body + b"SMUGGLED" * 10))
        with pytest.raises(Broken) as refused:
            await move(src, dst, size, last=True)
        assert refused.value.wire is src
        await sending
        dst.close()
        assert await receiving == body


async def test_a_body_cut_short_is_truncated() -> None:
    size = 8 * 2**20
    body = os.urandom(size // 2)
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):

        async def send_and_end() -> None:
            await _send(writer, body)
            await asyncio.sleep(0.05)  # the redirect is under way
            writer.shutdown(socket.SHUT_WR)

        sending = asyncio.ensure_future(send_and_end())
        receiving = asyncio.ensure_future(_read(reader, len(body)))
        with pytest.raises(Truncated) as cut:
            await move(src, dst, size, last=True)
        assert cut.value.wire is src
        assert await receiving == body
        await sending


async def test_a_reset_source_ends_the_redirect() -> None:
    """The upstream resets mid-body (as a pause's abort does to a guest's connections)."""
    size = 8 * 2**20
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        moving = asyncio.ensure_future(move(src, dst, size, last=True))
        await _send(writer, os.urandom(2 * 2**20))
        receiving = asyncio.ensure_future(_read(reader, 2 * 2**20))
        assert len(await receiving) == 2 * 2**20
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with pytest.raises(Broken) as ended:
            await asyncio.wait_for(moving, 10)
        assert ended.value.wire is src


async def test_a_reader_that_leaves_ends_the_redirect() -> None:
    size = 64 * 2**20
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        moving = asyncio.ensure_future(move(src, dst, size, last=True))
        sending = asyncio.ensure_future(_send(writer, os.urandom(size)))
        await _read(reader, 2 * 2**20)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reader.close()
        with pytest.raises(Broken) as ended:
            await asyncio.wait_for(moving, 10)
        assert ended.value.wire is dst
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)


async def test_closing_a_wire_ends_a_redirect() -> None:
    async with wire_chain(_tcp_pair) as (writer, src, dst, _reader):
        moving = asyncio.ensure_future(move(src, dst, 8 * 2**20, last=True))
        await _send(writer, os.urandom(2 * 2**20))
        await asyncio.sleep(0.05)
        assert not moving.done()
        src.close()
        with pytest.raises(Broken) as broken:
            await moving
        assert broken.value.wire is src


async def test_a_request_body_is_never_redirected() -> None:
    """Without ``last`` (a request body: a pipelined request may follow it at once), the
    bytes go through the process."""
    size = 6 * 2**20
    body = os.urandom(size)
    async with wire_chain(_tcp_pair) as (writer, src, dst, reader):
        before = _redirected()
        sending = asyncio.ensure_future(_send(writer, body + b"NEXT"))
        receiving = asyncio.ensure_future(_read(reader, size))
        await move(src, dst, size)
        assert await receiving == body
        await sending
        assert _redirected() == before
        while len(src.buffer) < 4:
            assert await src.fill()
        assert bytes(src.buffer) == b"NEXT"


def test_only_tcp_sockets_are_redirected() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(sockmap.Unavailable) as refused:
        sockmap.Redirect(a, b, 1 << 20, 1 << 20)
    assert not refused.value.lasting


_WITHOUT_BPF = """
import asyncio, hashlib, os, socket, sys
from wrenn.core.http1 import redirect_in_kernel, wire
from wrenn.core.http1.wire import Wire, move

async def main():
    redirect_in_kernel(True)
    listener = socket.create_server(("127.0.0.1", 0))
    writer = socket.create_connection(listener.getsockname()); upstream, _ = listener.accept()
    reader = socket.create_connection(listener.getsockname()); downstream, _ = listener.accept()
    body = os.urandom(16 << 20)
    loop = asyncio.get_running_loop()
    for sock in (writer, reader):
        sock.setblocking(False)
    sending = asyncio.ensure_future(loop.sock_sendall(writer, body))
    async def read():
        out = bytearray()
        while len(out) < len(body):
            out += await loop.sock_recv(reader, 1 << 20)
        return bytes(out)
    receiving = asyncio.ensure_future(read())
    await move(Wire(upstream), Wire(downstream), len(body), last=True)
    await sending
    assert await receiving == body
    print(wire.redirecting.unavailable, wire.redirecting.bodies)

asyncio.run(main())
"""


def test_without_the_right_to_load_bpf_the_relay_copies() -> None:
    """A process without CAP_BPF (root with every capability dropped, as a locked-down
    service runs): the body goes through the relay, once said why."""
    done = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--",
            sys.executable,
            "-c",
            _WITHOUT_BPF,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip().splitlines()
    assert said[-1] == "cannot load the redirect program: Operation not permitted 0"
    assert "relay.not_redirecting" in said[0]  # logged once
