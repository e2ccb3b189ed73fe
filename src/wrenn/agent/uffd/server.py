"""``UffdServer``: the page server a Firecracker Uffd-backend restore connects to, controlled
from asyncio while its serving loop runs on a dedicated thread.

    server = UffdServer(run_dir / "uffd.sock", reader, prefetch=offsets)
    await server.start()                  # listening: now PUT /snapshot/load with the Uffd backend
    async with asyncio.timeout(10):
        await server.wait_connected()     # Firecracker sent its regions and the userfaultfd
    ...
    await server.stop()                   # after the VM is gone (or wait_closed(): it noticed)

The memory source must stay open until ``stop()`` or ``wait_closed()`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from wrenn.agent.uffd.handshake import GuestRegion, parse_regions
from wrenn.agent.uffd.pager import Pager, PageSource, UffdStats
from wrenn.core.errors import FailedPrecondition, InvalidArgument
from wrenn.log import get

log = get(__name__)

_T = TypeVar("_T")
_RECV_BYTES = 1 << 16
_MAX_HANDSHAKE_BYTES = 1 << 20
_UCRED = struct.Struct("3i")


class UffdServer:
    """Serves one VM's guest memory from ``memory`` over the userfaultfd the VMM hands us.

    ``prefetch``: device offsets to copy in right after the handshake, in order, while no
    fault is waiting. ``max_events``: events read per wake-up (1 turns batching off).
    ``readahead_pages``: also populate up to this many missing pages after each faulting run.
    """

    def __init__(
        self,
        socket_path: Path,
        memory: PageSource,
        *,
        prefetch: Sequence[int] = (),
        max_events: int = 256,
        readahead_pages: int = 0,
    ) -> None:
        if len(os.fsencode(socket_path)) >= 108:
            raise InvalidArgument(f"socket path too long for a unix socket: {socket_path}")
        self.socket_path = socket_path
        self._memory = memory
        self._prefetch = list(prefetch)
        self._max_events = max_events
        self._readahead = readahead_pages
        self._pager: Pager | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._stop_r = self._stop_w = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected: asyncio.Future[list[GuestRegion]] | None = None
        self._prefetched: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[str] | None = None
        self.peer_pid: int | None = None

    # -- control ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the socket and start the serving thread. Returns once listening."""
        if self._thread is not None:
            raise FailedPrecondition("uffd server already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connected = loop.create_future()
        self._prefetched = loop.create_future()
        self._closed = loop.create_future()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fspath(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(1)
            listener.setblocking(False)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(
            target=self._main, name=f"uffd:{self.socket_path.name}", daemon=True
        )
        self._thread.start()
        log.info("uffd.listening", socket=str(self.socket_path))

    async def wait_connected(self) -> list[GuestRegion]:
        """The regions, once the VMM has connected and handed over its userfaultfd."""
        return await asyncio.shield(self._future(self._connected))

    async def wait_prefetched(self) -> None:
        """Returns once every prefetch page is in (or skipped because already present)."""
        await asyncio.shield(self._future(self._prefetched))

    async def wait_closed(self) -> str:
        """Why serving ended: "vm_gone" or "stopped". Raises what ended it otherwise."""
        return await asyncio.shield(self._future(self._closed))

    async def stop(self) -> None:
        """End serving (the VM must be gone or going: its faults stay unanswered after this),
        release the socket and every descriptor. Idempotent."""
        if self._thread is None:
            return
        if self._stop_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._stop_w, b"x")
        closed = self._future(self._closed)
        with contextlib.suppress(Exception):
            await asyncio.shield(closed)
        await asyncio.shield(asyncio.to_thread(self._thread.join))
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def __aenter__(self) -> UffdServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def stats(self) -> UffdStats:
        return self._pager.stats.copy() if self._pager is not None else UffdStats()

    def touched_offsets(self) -> list[int]:
        """Device offsets the guest faulted on, first touch first: the next prefetch list."""
        if self._pager is None:
            return []
        return list(dict.fromkeys(self._pager.touched))

    def _future(self, fut: asyncio.Future[_T] | None) -> asyncio.Future[_T]:
        if fut is None:
            raise FailedPrecondition("uffd server not started")
        return fut

    # -- the serving thread ------------------------------------------------------------------

    def _notify(self, fut: asyncio.Future[_T] | None, value: _T | BaseException) -> None:
        loop = self._loop
        if fut is None or loop is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
                fut.exception()  # retrieved: whoever waits sees it, nobody else is warned
            else:
                fut.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle)

    def _main(self) -> None:
        conn: socket.socket | None = None
        uffd = pidfd = -1
        reason: str | BaseException = "stopped"
        try:
            conn = self._accept()
            if conn is not None:
                regions, uffd = self._handshake(conn)
                pidfd = self._watch_peer(conn)
                log.info("uffd.connected", regions=len(regions), peer_pid=self.peer_pid)
                self._notify(self._connected, regions)
                self._pager = Pager(
                    uffd,
                    regions,
                    self._memory,
                    stop_fd=self._stop_r,
                    peer=conn.fileno(),
                    pidfd=pidfd if pidfd >= 0 else None,
                    prefetch=self._prefetch,
                    max_events=self._max_events,
                    readahead_pages=self._readahead,
                    on_prefetched=lambda: self._notify(self._prefetched, None),
                )
                reason = self._pager.run()
        except BaseException as err:  # the thread's boundary: logged once, handed to waiters
            log.error("uffd.failed", socket=str(self.socket_path), exc_info=err)
            reason = err
        finally:
            for fd in (uffd, pidfd):
                if fd >= 0:
                    os.close(fd)
            if conn is not None:
                conn.close()
            if self._listener is not None:
                self._listener.close()
            failure = reason if isinstance(reason, BaseException) else None
            ended = FailedPrecondition(f"uffd server ended before that: {reason}")
            self._notify(self._connected, failure or ended)
            self._notify(self._prefetched, failure or ended)
            self._notify(self._closed, reason)
            if not isinstance(reason, BaseException):
                log.info("uffd.closed", reason=reason, **vars(self.stats))

    def _wait_readable(self, fd: int) -> bool:
        """Block until ``fd`` is readable (True) or a stop was requested (False)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return False
            if fd in ready:
                return True

    def _accept(self) -> socket.socket | None:
        assert self._listener is not None
        while self._wait_readable(self._listener.fileno()):
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue
            self._listener.close()
            self._listener = None
            conn.setblocking(False)
            return conn
        return None

    def _handshake(self, conn: socket.socket) -> tuple[list[GuestRegion], int]:
        """Read the regions message and the userfaultfd riding on it."""
        payload = b""
        fds: list[int] = []
        try:
            # One sendmsg; only a read that fills the buffer can have left some behind.
            while True:
                if not self._wait_readable(conn.fileno()):
                    raise FailedPrecondition("stopped during the uffd handshake")
                try:
                    data, got, _flags, _addr = socket.recv_fds(conn, _RECV_BYTES, 4)
                except BlockingIOError:
                    continue
                fds.extend(got)
                if not data:
                    raise InvalidArgument("the VMM hung up during the uffd handshake")
                payload += data
                if len(payload) > _MAX_HANDSHAKE_BYTES:
                    raise InvalidArgument("uffd handshake message too large")
                if len(data) < _RECV_BYTES:
                    break
            if len(fds) != 1:
                raise InvalidArgument(f"expected one userfaultfd in the handshake, got {len(fds)}")
            regions = parse_regions(payload, self._memory.size_bytes)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        uffd = fds[0]
        # poll() on a blocking userfaultfd always reports an error: insist on non-blocking.
        fcntl.fcntl(uffd, fcntl.F_SETFL, fcntl.fcntl(uffd, fcntl.F_GETFL) | os.O_NONBLOCK)
        return regions, uffd

    def _watch_peer(self, conn: socket.socket) -> int:
        """A pidfd of the VMM, so its exit ends serving even if it left the socket open."""
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, _uid, _gid = _UCRED.unpack(raw)
        self.peer_pid = pid or None
        if not pid:
            return -1
        try:
            return os.pidfd_open(pid)
        except OSError:
            return -1
