"""File contents in and out of the sandbox for the /files endpoints.

A file is opened (and, for uploads, its missing parent directories made) on a thread acting
as the requesting user, so permissions are the user's and new files and directories belong
to them. The bytes then move through the open descriptor on plain worker threads in large
chunks, with one chunk in flight while the event loop handles the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from wrenn.core.errors import InvalidArgument, from_os_error
from wrenn.envd.filesystem import dirs, entry
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User

#: Bytes read from a file per worker-thread call on download.
READ_CHUNK_BYTES = 4 << 20
#: Bytes gathered from the request before one worker-thread write on upload.
WRITE_CHUNK_BYTES = 4 << 20
#: gzip level of compressed downloads (Go's default, as E2B's envd uses).
GZIP_LEVEL = 6
FILE_MODE = 0o666


# -- download ------------------------------------------------------------------------------


def _open_for_read(path: str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"path is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"path is not a regular file: {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class FileReader:
    """An open regular file streamed out in chunks, optionally gzip-compressed."""

    def __init__(self, fd: int, st: os.stat_result, path: str) -> None:
        self.fd = fd
        self.size_bytes = st.st_size
        self.mtime_s = st.st_mtime
        self.path = path

    @classmethod
    async def open(cls, user: User, path: str) -> FileReader:
        fd, st = await as_user(user, path, _open_for_read, path)
        return cls(fd, st, path)

    async def chunks(self, *, gzip: bool) -> AsyncIterator[bytes]:
        """The file's bytes (gzip-compressed when asked), reading one chunk ahead. The file
        is closed when the iteration ends, however it ends."""
        loop = asyncio.get_running_loop()
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None
        fd = self.fd

        def next_chunk() -> tuple[bytes, bool]:
            data = os.read(fd, READ_CHUNK_BYTES)
            if compressor is None:
                return data, not data
            if data:
                return compressor.compress(data), False
            return compressor.flush(), True

        pending = loop.run_in_executor(None, next_chunk)
        try:
            while True:
                try:
                    chunk, done = await pending
                except OSError as err:
                    raise from_os_error(err, self.path) from err
                if not done:
                    pending = loop.run_in_executor(None, next_chunk)
                if chunk:
                    yield chunk
                if done:
                    return
        finally:
            owned, self.fd = self.fd, -1
            _close_after(pending, owned)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        _close_after(None, fd)


def _close_after(pending: asyncio.Future[Any] | None, fd: int) -> None:
    """Close ``fd`` once no worker thread uses it any more."""
    if fd < 0:
        return
    if pending is None or pending.done():
        os.close(fd)
    else:
        pending.add_done_callback(lambda _: os.close(fd))


# -- upload --------------------------------------------------------------------------------


def _open_for_write(path: str) -> tuple[int, bool]:
    """Open ``path`` for writing from the start, making missing parents; returns the
    descriptor and whether the file was created by this call."""
    dirs.ensure(os.path.dirname(path))
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE), True
    except FileExistsError:
        pass
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"path is a directory: {path}")
    return os.open(path, flags | os.O_TRUNC), False


def write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of ``data`` at ``fd``'s offset (blocking: on a worker thread)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class FileWriter:
    """One destination file of an upload. ``abort`` removes a file the upload created."""

    def __init__(self, user: User, path: str, fd: int, created: bool) -> None:
        self.user = user
        self.path = path
        self.fd = fd
        self.created = created
        self._buffer = bytearray()
        self._pending: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, user: User, path: str) -> FileWriter:
        fd, created = await as_user(user, path, _open_for_write, path)
        return cls(user, path, fd, created)

    async def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= WRITE_CHUNK_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        await self._wait()
        if not self._buffer:
            return
        chunk, self._buffer = self._buffer, bytearray()
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, write_all, self.fd, chunk)

    async def _wait(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            await pending
        except OSError as err:
            raise from_os_error(err, self.path) from err

    async def receive(self, receive: Callable[[int], Awaitable[None]]) -> None:
        """Let ``receive`` write into the file at its current offset (after what is
        buffered here): the kernel moving a request body in (``envd.splicebody``)."""
        await self._flush()
        await self._wait()
        try:
            await receive(self.fd)
        except OSError as err:
            raise from_os_error(err, self.path) from err

    async def set_metadata(self, metadata: dict[str, str]) -> None:
        if not metadata:
            return
        try:
            await asyncio.to_thread(entry.write_metadata, self.fd, metadata)
        except OSError as err:
            raise from_os_error(err, self.path) from err

    async def close(self) -> None:
        """Write what is buffered and close the file."""
        try:
            await self._flush()
            await self._wait()
        finally:
            fd, self.fd = self.fd, -1
            if fd >= 0:
                await asyncio.to_thread(os.close, fd)

    async def abort(self) -> None:
        """Stop writing; remove the file when this upload created it."""
        pending, self._pending = self._pending, None
        fd, self.fd = self.fd, -1
        _close_after(pending, fd)
        if self.created:
            await as_user(self.user, self.path, _unlink, self.path)
