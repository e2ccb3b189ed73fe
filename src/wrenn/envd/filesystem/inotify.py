"""Linux inotify through ctypes, read by the asyncio event loop.

One :class:`Inotify` owns one inotify descriptor; one :class:`Hub` shares it among every
directory watch of an envd process. The kernel caps inotify *instances* per user
(``fs.inotify.max_user_instances``, 128 by default) far below *watches*
(``max_user_watches``), so watches must not each open their own descriptor.

``add_watch`` is checked by the kernel against the calling thread's filesystem identity (read
permission on the directory), so callers add watches on a thread acting as the requesting
user. Reading happens on the event loop: the descriptor is non-blocking and registered with
``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


class Subscriber(Protocol):
    def deliver(self, events: list[RawEvent]) -> None:
        """Events of this subscriber's watches, in kernel order. Called on the event loop."""


class Hub:
    """One inotify descriptor shared by many subscribers.

    The kernel returns the same watch descriptor when two subscribers watch the same
    directory, so the hub counts references per (descriptor, subscriber) and removes a
    kernel watch only when its last reference goes. ``add``/``remove`` may run on worker
    threads (``add`` must, to act as the requesting user); the registration happens under
    the same lock as the syscall, so no event can arrive for a descriptor before its
    subscriber is known. Queue overflow (wd -1) is delivered to every subscriber.
    """

    def __init__(self) -> None:
        self._inotify: Inotify | None = None
        self._lock = threading.Lock()
        self._refs: dict[int, dict[Subscriber, int]] = defaultdict(dict)

    def open(self) -> None:
        """Open the descriptor and start reading it. Call on the event loop; idempotent."""
        if self._inotify is None:
            self._inotify = Inotify()
            self._inotify.on_readable(self._on_readable)

    def add(self, subscriber: Subscriber, path: str, mask: int = DIR_EVENTS) -> int:
        """Watch ``path`` for ``subscriber``. Blocking; runs with the calling thread's
        filesystem identity."""
        if self._inotify is None:
            raise RuntimeError("inotify hub is not open")
        with self._lock:
            wd = self._inotify.add_watch(path, mask)
            refs = self._refs[wd]
            refs[subscriber] = refs.get(subscriber, 0) + 1
        return wd

    def remove(self, subscriber: Subscriber, wd: int) -> None:
        with self._lock:
            refs = self._refs.get(wd)
            if refs is None or subscriber not in refs:
                return
            refs[subscriber] -= 1
            if refs[subscriber] == 0:
                del refs[subscriber]
            if not refs:
                del self._refs[wd]
                if self._inotify is not None:
                    self._inotify.rm_watch(wd)

    def remove_all(self, subscriber: Subscriber) -> None:
        with self._lock:
            for wd in list(self._refs):
                refs = self._refs[wd]
                if refs.pop(subscriber, None) is not None and not refs:
                    del self._refs[wd]
                    if self._inotify is not None:
                        self._inotify.rm_watch(wd)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._refs)

    def _on_readable(self) -> None:
        if self._inotify is None:
            return
        batch = self._inotify.read()
        if not batch:
            return
        routed: dict[Subscriber, list[RawEvent]] = defaultdict(list)
        with self._lock:
            everyone = {s for refs in self._refs.values() for s in refs}
            for event in batch:
                targets = everyone if event.wd == -1 else self._refs.get(event.wd, {})
                for subscriber in targets:
                    routed[subscriber].append(event)
                if event.mask & IN_IGNORED:
                    self._refs.pop(event.wd, None)
        for subscriber, events in routed.items():
            subscriber.deliver(events)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        with self._lock:
            self._refs.clear()
