"""One connected, non-blocking TCP socket driven directly by the running event loop: reads
land in ``buffer``, writes go straight to the socket, and bodies move from one wire to another
without becoming Python objects.

How a body moves depends on who reads it next. Bytes leaving the host go with ``splice(2)``
through a pipe: they never enter this process, the relay spends least. Bytes for a reader on
this host (a loopback peer) go through one buffer here (``recv_into``, ``send``): spliced
pages reach that reader cold, and its copy out of them cost it more than this one costs the
relay, so on one machine the copy is faster end to end (bench/controlplane.py measures both:
CPU seconds per hop and the reader's). A long response body from a peer elsewhere is
spliced in batches whoever reads it (``BATCH_S``: its pages arrive from the network, not
from a page cache); one from a peer on this host is redirected in the kernel
(``redirect_in_kernel``, ``sockmap``).

Why not asyncio streams or protocols: each piece read there becomes a new ``bytes`` object and
is copied again into buffers on the way out; a relay only has to pass bytes on.

Invariants:
- at most one task reads a wire and at most one writes it at a time (a relay's two
  directions use different sides);
- a readiness callback is registered only while a task waits for it; ``close`` removes it
  and fails the wait, so a wire can be closed at any moment (a pause ends the agent's
  connections into a guest while relays still wait on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from wrenn import log
from wrenn.core.http1 import sockmap

#: One read of a head, a chunk size line or a small body.
READ_BYTES = 256 * 1024
#: Bodies (and chunks) at least this long are pumped (spliced, or copied through one buffer);
#: shorter ones go through the head buffer.
PUMP_MIN_BYTES = 64 * 1024
#: A pipe's capacity, asked for when it is made (``F_SETPIPE_SZ``).
PIPE_BYTES = 1 << 20
#: Empty pipes kept for the next splice (two descriptors each).
_SPARE_PIPES = 16
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: SO_LINGER on, 0 s: close() resets the connection.
_RESET = struct.pack("ii", 1, 0)

_log = log.get(__name__)


class Broken(Exception):
    """I/O on ``wire`` failed: its peer reset or closed it, or it was closed here."""

    def __init__(self, wire: Wire, message: str) -> None:
        super().__init__(message)
        self.wire = wire


class Truncated(Broken):
    """The peer closed its side before the message it was sending was complete."""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _on_this_host(sock: socket.socket) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # a Unix socket
    try:
        peer, own = sock.getpeername()[0], sock.getsockname()[0]
    except OSError:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback) or peer == own


class Wire:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        #: Bytes read and not consumed yet.
        self.buffer = bytearray()
        self.closed = False
        #: The peer is on this host: bodies for it are copied, not spliced, and long ones
        #: from it redirected, not batched (see above).
        self.local_peer = _on_this_host(sock)
        self._loop = asyncio.get_running_loop()
        self._waiting_read: asyncio.Future[None] | None = None
        self._waiting_write: asyncio.Future[None] | None = None
        self._watched = False

    def __repr__(self) -> str:
        return f"Wire(fd={self.fd}, buffered={len(self.buffer)}, closed={self.closed})"

    def watch(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever a read would not block, until ``watch(None)`` or the
        wire closes; not while a task reads it."""
        if self.closed:
            return
        if self._watched:
            self._loop.remove_reader(self.fd)
            self._watched = False
        if callback is not None:
            assert self._waiting_read is None
            self._loop.add_reader(self.fd, callback)
            self._watched = True

    async def readable(self) -> None:
        """Wait until a read would not block. Raises ``Broken`` if the wire is closed."""
        if self.closed:
            raise Broken(self, "closed")
        assert not self._watched
        fut = self._waiting_read = self._loop.create_future()
        self._loop.add_reader(self.fd, _wake, fut)
        try:
            await fut
        finally:
            self._waiting_read = None
            if not self.closed:
                self._loop.remove_reader(self.fd)

    async def writable(self) -> None:
        """Wait until a write would not block. Raises ``Broken`` if the wire is closed."""
        if self.closed:
            raise Broken(self, "closed")
        fut = self._waiting_write = self._loop.create_future()
        self._loop.add_writer(self.fd, _wake, fut)
        try:
            await fut
        finally:
            self._waiting_write = None
            if not self.closed:
                self._loop.remove_writer(self.fd)

    def read_now(self, max_bytes: int) -> bytes | None:
        """What has arrived, at most ``max_bytes``, without waiting: ``None`` when nothing
        has, ``b""`` at the end. Raises ``Broken`` when the read fails."""
        try:
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as err:
            raise Broken(self, f"read failed: {err.strerror}") from err

    def read_into_now(self, view: memoryview) -> int | None:
        """``read_now`` into ``view``: how much, ``None`` when nothing has arrived, 0 at the
        end."""
        try:
            return self.sock.recv_into(view)
        except BlockingIOError:
            return None
        except OSError as err:
            raise Broken(self, f"read failed: {err.strerror}") from err

    async def fill(self, max_bytes: int = READ_BYTES) -> int:
        """Read once more into ``buffer`` (waiting for data); how much came, 0 at the end."""
        start = len(self.buffer)
        while True:
            if self.closed:
                raise Broken(self, "closed")
            data = self.read_now(max_bytes)
            if data is None:
                if len(self.buffer) > start:
                    return len(self.buffer) - start  # ``feed`` brought some
                await self.readable()
                continue
            self.buffer += data
            return len(self.buffer) - start if data else 0

    def feed(self, data: bytes) -> None:
        """Add bytes read elsewhere (by the transport this socket was taken from) and wake a
        reader waiting for data."""
        self.buffer += data
        waiter = self._waiting_read
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (waiting while the socket's buffer is full)."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise Broken(self, "closed")
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await self.writable()
                continue
            except OSError as err:
                raise Broken(self, f"write failed: {err.strerror}") from err
            view = view[sent:]

    async def send_buffered(self, dst: Wire, n: int) -> None:
        """Pass the first ``n`` buffered bytes on to ``dst`` and drop them here."""
        if n:
            await dst.send(memoryview(self.buffer)[:n])
            del self.buffer[:n]

    def at_eof(self) -> bool:
        """Whether the peer has closed its side or sent something unasked for (an idle
        pooled connection is then no longer usable). Never waits."""
        if self.closed or self.buffer:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"": closed; anything else: unasked for
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        """Close the socket; a task waiting on it gets ``Broken``. Safe at any moment."""
        if self.closed:
            return
        self.closed = True
        if self._watched:
            self._loop.remove_reader(self.fd)
            self._watched = False
        if self._waiting_read is not None:
            self._loop.remove_reader(self.fd)
            if not self._waiting_read.done():
                self._waiting_read.set_exception(Broken(self, "closed"))
        if self._waiting_write is not None:
            self._loop.remove_writer(self.fd)
            if not self._waiting_write.done():
                self._waiting_write.set_exception(Broken(self, "closed"))
        self.sock.close()

    def abort(self) -> None:
        """Close with a reset instead of an orderly end: the peer sees the message cut."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.close()


async def move(src: Wire, dst: Wire, n: int | None, *, last: bool = False) -> None:
    """Move ``n`` bytes of ``src`` (``None``: until it ends) to ``dst``: its buffer first,
    then straight from socket to socket. ``last``: nothing may follow these bytes on ``src``
    until ``dst``'s peer asks for more (a response's body), so they may be redirected in the
    kernel (``redirect_in_kernel``). Raises ``Truncated`` when ``src`` ends short."""
    if n is None:
        await src.send_buffered(dst, len(src.buffer))
        await _pump(src, dst, None)
        return
    head = min(n, len(src.buffer))
    await src.send_buffered(dst, head)
    rest = n - head
    long_response = last and rest >= LONG_BODY_BYTES
    if long_response and not src.local_peer:
        await _pump(src, dst, rest, batch_s=BATCH_S)
    elif long_response and redirecting.enabled:
        await _redirect(src, dst, rest)
    elif rest >= PUMP_MIN_BYTES:
        await _pump(src, dst, rest)
    elif rest:
        await _copy(src, dst, rest)


async def _copy(src: Wire, dst: Wire, n: int) -> None:
    while n:
        if not src.buffer and not await src.fill(min(n, READ_BYTES)):
            raise Truncated(src, f"ended {n} bytes short")
        take = min(n, len(src.buffer))
        await src.send_buffered(dst, take)
        n -= take


class _Pipes:
    """Pipes for ``splice``, reused (only empty ones come back); one pool per process, for
    whoever splices (the relays here, envd's uploads)."""

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.usable = True

    def take(self) -> tuple[int, int]:
        with self._lock:
            if self._free:
                return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return r, w

    def give(self, pipe: tuple[int, int], *, empty: bool) -> None:
        with self._lock:
            if empty and len(self._free) < _SPARE_PIPES:
                self._free.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])


pipes = _Pipes()


async def _pump(src: Wire, dst: Wire, n: int | None, *, batch_s: float = 0.0) -> None:
    """Socket to socket (through a pipe, or a buffer for a reader on this host); ``n`` bytes,
    or until ``src`` ends when ``None``. ``batch_s``: move the body in batches, spliced for
    any reader (see ``BATCH_S``): once a read has emptied ``src``'s queue and everything read
    is passed on, wait that long before reading again."""
    if (dst.local_peer and not batch_s) or not pipes.usable:
        await _copy_pump(src, dst, n)
        return
    pipe = pipes.take()
    queued = 0  # bytes in the pipe
    remaining = n if n is not None else -1
    ended = moved = False
    try:
        while remaining or queued:
            if src.closed or dst.closed:
                raise Broken(src if src.closed else dst, "closed")
            progressed = drained = False
            if remaining and not ended and queued < PIPE_BYTES:
                room = PIPE_BYTES - queued
                want = room if remaining < 0 else min(remaining, room)
                try:
                    got = os.splice(src.fd, pipe[1], want, flags=_SPLICE)
                except BlockingIOError:
                    got = -1
                except OSError as err:
                    if err.errno != errno.EINVAL or moved:
                        raise Broken(src, f"read failed: {err.strerror}") from err
                    pipes.usable = False  # no splice for these sockets: copy instead
                    await _copy_pump(src, dst, n)
                    return
                if got == 0:
                    if remaining > 0:
                        raise Truncated(src, f"ended {remaining} bytes short")
                    ended, remaining = True, 0
                elif got > 0:
                    queued += got
                    moved = True
                    if remaining > 0:
                        remaining -= got
                    progressed = True
                    drained = got < want
            if queued:
                try:
                    put = os.splice(pipe[0], dst.fd, queued, flags=_SPLICE)
                except BlockingIOError:
                    put = 0
                except OSError as err:
                    raise Broken(dst, f"write failed: {err.strerror}") from err
                if put:
                    queued -= put
                    progressed = True
            if not progressed:
                if queued:
                    await dst.writable()
                else:
                    await src.readable()
            elif batch_s and drained and remaining and not queued:
                await asyncio.sleep(batch_s)
    finally:
        pipes.give(pipe, empty=queued == 0)


#: The buffer of a copying pump, and how many are kept for the next ones (a pump holds one
#: only while it runs: sharing across threads is safe, list.pop and append are atomic).
_COPY_BYTES = 1 << 20
_SPARE_BUFFERS = 8
_buffers: list[memoryview] = []


async def _copy_pump(src: Wire, dst: Wire, n: int | None) -> None:
    """``_pump`` through one buffer of this process: read as much as is there, write it all,
    again."""
    try:
        view = _buffers.pop()
    except IndexError:
        view = memoryview(bytearray(_COPY_BYTES))
    try:
        remaining = n if n is not None else -1
        while remaining:
            if src.closed or dst.closed:
                raise Broken(src if src.closed else dst, "closed")
            want = _COPY_BYTES if remaining < 0 else min(remaining, _COPY_BYTES)
            got = src.read_into_now(view[:want])
            if got is None:
                await src.readable()
                continue
            if not got:
                if remaining > 0:
                    raise Truncated(src, f"ended {remaining} bytes short")
                return
            if remaining > 0:
                remaining -= got
            await dst.send(view[:got])
    finally:
        if len(_buffers) < _SPARE_BUFFERS:
            _buffers.append(view)


#: Response bodies at least this long are moved in batches when their source is elsewhere
#: (``BATCH_S``), else redirected in the kernel when it can (``sockmap``): a batch waits, and
#: a redirect is followed by looking at it (``_FOLLOW_S``), which shorter ones would feel.
LONG_BODY_BYTES = 4 << 20
#: A long response body from a peer elsewhere (a guest, another host) is read once this long
#: has passed after a read emptied its queue, all that arrived meanwhile at once: the relay's
#: socket acknowledges it once per batch instead of once or twice per segment, and each
#: acknowledgement costs the sender (a guest's vCPU above all). Each read after a wait takes
#: the whole queue, so the pace is bounded only by what the socket buffers per wait (some
#: GB/s); a batch adds at most this much latency.
BATCH_S = 0.001
#: How far a redirect may run ahead of what its target has taken: the most of a body the
#: kernel holds for one reader (past it, the rest spills back to the relay).
REDIRECT_WINDOW_BYTES = 8 << 20
#: How often a redirect is looked at: while it moves (sooner when its end is nearer), and at
#: most while nothing does.
_FOLLOW_S, _FOLLOW_END_S, _FOLLOW_IDLE_S = 0.002, 0.0005, 0.05


class _Redirecting:
    """Whether this process redirects long bodies in the kernel (off unless turned on), and
    why it cannot when it tried and could not."""

    def __init__(self) -> None:
        self.enabled = False
        self.unavailable: str | None = None
        #: Bodies (part) redirected since the start, counted when their redirect is in
        #: place (the relay may be interrupted before it sees the end go out: its client
        #: gone once it has everything), and the bytes the kernel moved of those it saw end.
        self.bodies = 0
        self.bytes = 0
        #: Redirects that spilled back to this process at least once (their reader fell
        #: behind); the bytes that spilled are not in ``bytes``.
        self.spills = 0


redirecting = _Redirecting()


def redirect_in_kernel(on: bool) -> None:
    """Move response bodies of at least ``LONG_BODY_BYTES`` from a peer on this host from
    socket to socket in the kernel (``sockmap``) when it can, instead of through this process
    (set once at start)."""
    redirecting.enabled = on


async def _redirect(src: Wire, dst: Wire, n: int) -> None:
    """Move ``n`` bytes: what has arrived through a buffer here, the rest by a kernel redirect
    (``sockmap``); pumped as usual when the kernel cannot, what spills copied here."""
    if redirecting.unavailable is not None:
        await _pump(src, dst, n)
        return
    # Read what has arrived until a read comes back short: the queue was emptied then, so no
    # segment of ``src`` is left partly read (what arrives later stays whole, however long
    # passing this on takes). One read, unless more than a window waits: then the pump.
    while len(src.buffer) < n:
        want = min(n - len(src.buffer), REDIRECT_WINDOW_BYTES)
        data = src.read_now(want)
        if data is None:
            break
        if not data:
            raise Truncated(src, f"ended {n - len(src.buffer)} bytes short")
        src.buffer += data
        if len(data) < want:
            break
        if len(src.buffer) < n:
            await move(src, dst, n)
            return
    n -= len(src.buffer)
    await src.send_buffered(dst, len(src.buffer))
    if not n:
        return
    if src.closed or dst.closed:
        raise Broken(src if src.closed else dst, "closed")
    try:
        redirect = sockmap.Redirect(src.sock, dst.sock, n, REDIRECT_WINDOW_BYTES)
    except sockmap.Unavailable as err:
        if err.lasting:
            redirecting.unavailable = str(err)
            _log.info("relay.not_redirecting", reason=str(err))
        await _pump(src, dst, n)
        return
    redirecting.bodies += 1
    try:
        copied = await _follow(redirect, src, dst)
        redirecting.bytes += n - copied
        if copied:
            redirecting.spills += 1
        if redirect.overrun():
            raise Broken(src, "sent past the end of the body")
    finally:
        redirect.close()


async def _follow(redirect: sockmap.Redirect, src: Wire, dst: Wire) -> int:
    """Wait until the whole body is out; how much of it went through this process (after a
    spill). Keeps the redirect's limit a window ahead of what the target took, and after a
    spill passes on what stayed with the source and lets the redirect resume."""
    n = redirect.n
    read_to = copied = 0  # how far spilled bytes were read here, and how many
    delay, last, at = _FOLLOW_S, (-1, -1), time.monotonic()
    while True:
        if src.closed or dst.closed:
            raise Broken(src if src.closed else dst, "closed")
        reached, spilled_at = redirect.progress()
        sent, target_open = redirect.sent()
        if sent >= n:
            return copied
        if not target_open:
            raise Broken(dst, "write failed: the connection was closed")
        if spilled_at is not None:
            read_to = max(read_to, spilled_at)
            if sent >= read_to and read_to < n:  # all before it is out: pass the rest on
                got = await _take(src, dst, n - read_to)
                read_to += got
                copied += got
                sent = redirect.sent()[0]
        elif sent >= reached and not redirect.source_open():
            raise Truncated(src, f"ended {n - reached} bytes short")
        redirect.allow(sent + REDIRECT_WINDOW_BYTES, read_to)
        now = time.monotonic()
        if sent > last[1] >= 0:  # at this pace, when the end is out
            end_s = (n - sent) * (now - at) / (sent - last[1])
            delay = min(_FOLLOW_S, max(end_s, _FOLLOW_END_S))
        elif (reached, sent) == last:
            delay = min(delay * 2, _FOLLOW_IDLE_S)
        last, at = (reached, sent), now
        await asyncio.sleep(delay)


async def _take(src: Wire, dst: Wire, most: int) -> int:
    """Pass on what waits at ``src`` (at most ``most`` bytes), without waiting for more; how
    much. Raises ``Truncated`` when ``src`` has ended."""
    try:
        view = _buffers.pop()
    except IndexError:
        view = memoryview(bytearray(_COPY_BYTES))
    moved = 0
    try:
        while moved < most:
            got = src.read_into_now(view[: min(most - moved, _COPY_BYTES)])
            if got is None:
                break
            if not got:
                raise Truncated(src, f"ended {most - moved} bytes short")
            await dst.send(view[:got])
            moved += got
    finally:
        if len(_buffers) < _SPARE_BUFFERS:
            _buffers.append(view)
    return moved
