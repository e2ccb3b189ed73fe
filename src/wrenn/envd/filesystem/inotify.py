"""Linux inotify through ctypes, read by the asyncio event loop.

One :class:`Inotify` owns one inotify descriptor. ``add_watch`` is checked by the kernel
against the calling thread's filesystem identity (read permission on the directory), so
callers add watches on a thread acting as the requesting user. Reading happens on the event
loop: the descriptor is non-blocking and registered with ``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: What a directory watch listens to: the changes E2B's watcher reports.
DIR_EVENTS = (
    IN_CREATE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_MODIFY
    | IN_ATTRIB
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(result: int, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


@dataclass(frozen=True, slots=True)
class RawEvent:
    wd: int
    mask: int
    cookie: int
    name: str


def parse(buffer: bytes) -> list[RawEvent]:
    """Decode the ``struct inotify_event`` records of one read."""
    events: list[RawEvent] = []
    offset = 0
    while offset + _HEADER.size <= len(buffer):
        wd, mask, cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        raw_name = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(RawEvent(wd, mask, cookie, os.fsdecode(raw_name)))
    return events


class Inotify:
    """An inotify descriptor. Not thread-safe for reading; ``add_watch``/``rm_watch`` may be
    called from any thread."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self._loop: asyncio.AbstractEventLoop | None = None

    def add_watch(self, path: str, mask: int = DIR_EVENTS) -> int:
        """Watch the directory ``path`` (not following a final symlink). Blocking."""
        flags = mask | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
        return _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), flags), path)

    def rm_watch(self, wd: int) -> None:
        """Stop watching ``wd``; a watch the kernel already dropped is not an error."""
        if _libc.inotify_rm_watch(self.fd, wd) < 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # already dropped by the kernel
                raise OSError(err, os.strerror(err))

    def read(self) -> list[RawEvent]:
        """Every event queued right now; empty when none."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        return parse(data)

    def on_readable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the running loop whenever events are queued."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, callback)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
