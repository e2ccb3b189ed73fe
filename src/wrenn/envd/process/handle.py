"""One process started by envd: its output readers, input, signals, PTY size and end.

Ending: the process has ended when its main process has exited, not when its pipes close.
Background children may keep the pipes open indefinitely, so once the main process has been
reaped each reader keeps reading only what is already there: it stops at end-of-file, after
``DRAIN_IDLE_S`` without new data, or ``DRAIN_MAX_S`` after the exit (time spent waiting for
slow subscribers not counted). The readers then close their ends; children that still write
get EPIPE, as with any command whose reader went away.

Invariant: ``pid`` is not reaped (and so cannot be reused) until the pidfd reports the exit;
only then is ``exited`` set, and signals are sent only while it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal

from wrenn import log
from wrenn.core.errors import FailedPrecondition, InvalidArgument
from wrenn.envd.process.fanout import Chunk, ExitStatus, Fanout, OutputKind, Subscriber
from wrenn.envd.process.launch import PtySize
from wrenn.envd.process.spawn import Spawned
from wrenn.gen.process.process_pb import ProcessConfig, ProcessInfo

_log = log.get(__name__)

READ_CHUNK_BYTES = 32 << 10
DRAIN_IDLE_S = 0.1
DRAIN_MAX_S = 2.0


def exit_status(returncode: int) -> ExitStatus:
    """The end event of a reaped process (``Popen.returncode``: negative for a signal),
    worded like Go's ``ProcessState.String()`` as E2B's envd reports it."""
    if returncode >= 0:
        text = f"exit status {returncode}"
        return ExitStatus(returncode, True, text, text if returncode else None)
    sig = -returncode
    name = (signal.strsignal(sig) or f"signal {sig}").lower()
    text = f"signal: {name}"
    return ExitStatus(-1, False, text, text)


class ProcessHandle:
    """A running (then finished) user process and everything attached to it."""

    def __init__(self, spawned: Spawned, config: ProcessConfig, tag: str | None) -> None:
        self._child = spawned.child
        self.pid: int = spawned.child.pid
        self.config = config
        self.tag = tag
        self.fanout = Fanout(f"pid {self.pid}")
        self._stdin_fd = spawned.stdin_fd
        self._stdout_fd = spawned.stdout_fd
        self._stderr_fd = spawned.stderr_fd
        self._pty_fd = spawned.pty_fd
        self._has_pty = spawned.pty_fd is not None
        self._pidfd = spawned.pidfd
        self._exited = asyncio.Event()
        self._read_waiters: set[asyncio.Future[None]] = set()
        self._write_lock = asyncio.Lock()
        self._write_waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # --- queries -------------------------------------------------------------------------

    @property
    def has_pty(self) -> bool:
        return self._has_pty

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def end(self) -> ExitStatus | None:
        return self.fanout.end

    def info(self) -> ProcessInfo:
        return ProcessInfo(config=self.config, pid=self.pid, tag=self.tag)

    def subscribe(self) -> Subscriber:
        return self.fanout.subscribe()

    # --- control -------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group (and to the main process, should it have left
        the group)."""
        if self.exited:
            return
        for send in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError):
                send(self.pid, sig)

    def kill_after(self, timeout_s: float) -> None:
        """SIGKILL the process group once ``timeout_s`` has passed, unless it ended before."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(timeout_s, self.signal, signal.SIGKILL)

    def resize(self, size: PtySize) -> None:
        if not self._has_pty:
            raise InvalidArgument(f"process with pid {self.pid} was not started with a pty")
        if self._pty_fd is not None:
            size.apply(self._pty_fd)

    async def write_stdin(self, data: bytes) -> None:
        if self._has_pty:
            raise InvalidArgument(
                f"process with pid {self.pid} has a pty: send its input as pty input"
            )
        await self._write(data, "stdin")

    async def write_pty(self, data: bytes) -> None:
        if not self._has_pty:
            raise InvalidArgument(
                f"process with pid {self.pid} has no pty: send its input as stdin"
            )
        await self._write(data, "pty")

    def close_stdin(self) -> None:
        """Signal EOF on stdin. Closing a stdin that is already closed (or was never opened)
        does nothing."""
        if self._has_pty:
            raise InvalidArgument(
                f"process with pid {self.pid} has a pty: send Ctrl-D (0x04) instead"
            )
        fd = self._stdin_fd
        if fd is None:
            return
        self._stdin_fd = None
        asyncio.get_running_loop().remove_writer(fd)
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(
                FailedPrecondition(f"stdin of process with pid {self.pid} was closed")
            )
        os.close(fd)

    async def _write(self, data: bytes, what: str) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        async with self._write_lock:
            while view:
                fd = self._pty_fd if what == "pty" else self._stdin_fd
                if fd is None or self.exited:
                    raise FailedPrecondition(
                        f"{what} of process with pid {self.pid} is closed or was not enabled"
                    )
                try:
                    view = view[os.write(fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError as err:
                    if err.errno in (errno.EPIPE, errno.EIO):
                        raise FailedPrecondition(
                            f"{what} of process with pid {self.pid} is closed"
                        ) from None
                    raise
                waiter: asyncio.Future[None] = loop.create_future()
                self._write_waiter = waiter
                loop.add_writer(fd, _resolve, waiter)
                try:
                    await waiter
                finally:
                    self._write_waiter = None
                    if fd in (self._pty_fd, self._stdin_fd):
                        loop.remove_writer(fd)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> ExitStatus:
        """Pump output until the process has ended, then deliver the end event."""
        readers = [
            asyncio.create_task(self._pump(fd, kind), name=f"pid {self.pid} {kind}")
            for fd, kind in self._outputs()
        ]
        try:
            await self._wait_exit()
            await asyncio.gather(*readers)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            self._release()
        status = exit_status(self._child.wait())
        self.fanout.finish(status)
        _log.debug("process.ended", pid=self.pid, status=status.status)
        return status

    def _outputs(self) -> list[tuple[int, OutputKind]]:
        if self._pty_fd is not None:
            return [(self._pty_fd, "pty")]
        pairs: list[tuple[int, OutputKind]] = []
        if self._stdout_fd is not None:
            pairs.append((self._stdout_fd, "stdout"))
        if self._stderr_fd is not None:
            pairs.append((self._stderr_fd, "stderr"))
        return pairs

    async def _wait_exit(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._pidfd, _resolve, done)
        try:
            await done
        finally:
            loop.remove_reader(self._pidfd)
        if self._child.poll() is None:  # a readable pidfd means the child is a zombie
            await asyncio.to_thread(self._child.wait)
        if self._deadline is not None:
            self._deadline.cancel()
        self._exited.set()
        for waiter in self._read_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _readable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._read_waiters.add(waiter)
        loop.add_reader(fd, _resolve, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(fd)
            self._read_waiters.discard(waiter)

    async def _pump(self, fd: int, kind: OutputKind) -> None:
        loop = asyncio.get_running_loop()
        drain_until: float | None = None
        try:
            while True:
                if self.exited and drain_until is None:
                    drain_until = loop.time() + DRAIN_MAX_S
                if drain_until is not None and loop.time() >= drain_until:
                    return
                try:
                    data = os.read(fd, READ_CHUNK_BYTES)
                except BlockingIOError:
                    if drain_until is None:
                        await self._readable(fd)
                        continue
                    try:
                        async with asyncio.timeout(DRAIN_IDLE_S):
                            await self._readable(fd)
                    except TimeoutError:
                        return
                    continue
                except OSError as err:
                    if err.errno == errno.EIO:  # pty: every slave end is closed
                        return
                    raise
                if not data:
                    return
                started = loop.time()
                await self.fanout.publish(Chunk(kind, data))
                if drain_until is not None:
                    drain_until += loop.time() - started
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("process.output_failed", pid=self.pid, stream=kind)

    def _release(self) -> None:
        loop = asyncio.get_running_loop()
        if self._deadline is not None:
            self._deadline.cancel()
        for fd in (self._stdin_fd, self._pty_fd):
            if fd is not None:
                loop.remove_writer(fd)
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(
                FailedPrecondition(f"process with pid {self.pid} has exited")
            )
        for fd in (self._stdin_fd, self._stdout_fd, self._stderr_fd, self._pty_fd, self._pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stdin_fd = self._stdout_fd = self._stderr_fd = self._pty_fd = None
        self._pidfd = -1


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
