"""The spawn gate: user processes are placed in the user cgroup and given their OOM score
before they exec, without envd forking.

A child created by ``posix_spawn`` runs no code of envd's, so it cannot join a cgroup itself,
and envd only learns its pid once it has exec'd, when its first forks may already have
escaped. So its first file action opens the gate: a memfd watched by a fanotify group for
``FAN_OPEN_PERM``. The kernel holds that ``open`` until envd answers, and tells envd the pid of
the process asking. envd (on its event loop) writes the pid into the user group's
``cgroup.procs`` and ``100`` into its ``oom_score_adj``, then allows the open; the child goes on
to its exec inside the group. If placing fails the open is denied, and the spawn fails with
``EPERM`` (counted in :attr:`SpawnGate.denied`).

Only envd and its children before their exec hold the memfd (it is close-on-exec), so nothing
else can reach the gate. Should envd go away, the kernel allows whatever is still waiting.

Needs ``CAP_SYS_ADMIN`` and a kernel with ``CONFIG_FANOTIFY_ACCESS_PERMISSIONS``;
:meth:`SpawnGate.open` raises ``OSError`` otherwise.

A child at the gate waits for the event loop, and the thread that spawned it cannot be stopped
until the child has exec'd: a tracer that stops all of envd's threads before going on (py-spy
in its default blocking mode, gdb) deadlocks with a start in progress until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Callable

from wrenn import log

_log = log.get(__name__)

_FAN_CLOEXEC = 0x01
_FAN_NONBLOCK = 0x02
_FAN_CLASS_CONTENT = 0x04
_FAN_MARK_ADD = 0x01
_FAN_OPEN_PERM = 0x0001_0000
_FAN_ALLOW = 0x01
_FAN_DENY = 0x02
_METADATA_VERSION = 3
#: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid.
_EVENT = struct.Struct("=IBBHQii")
#: struct fanotify_response: fd, response.
_RESPONSE = struct.Struct("=iI")

_libc = ctypes.CDLL(None, use_errno=True)


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class SpawnGate:
    """One fanotify group watching one memfd. ``place(pid)`` runs for every process held at
    the gate; it raises ``OSError`` when the process must not go on."""

    def __init__(self, fanotify_fd: int, memfd: int, place: Callable[[int], None]) -> None:
        self._fan = fanotify_fd
        self._memfd = memfd
        self._place = place
        self._loop: asyncio.AbstractEventLoop | None = None
        self.denied = 0

    @classmethod
    def open(cls, place: Callable[[int], None]) -> SpawnGate:
        init = _libc.fanotify_init
        init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        mark = _libc.fanotify_mark
        mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        fan = int(
            init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC | _FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
        )
        if fan < 0:
            raise _errno_error("fanotify_init")
        try:
            memfd = os.memfd_create("wrenn-spawn-gate", os.MFD_CLOEXEC)
        except OSError:
            os.close(fan)
            raise
        if mark(fan, _FAN_MARK_ADD, _FAN_OPEN_PERM, memfd, None) != 0:
            error = _errno_error("fanotify_mark")
            os.close(memfd)
            os.close(fan)
            raise error
        return cls(fan, memfd, place)

    @property
    def path(self) -> str:
        """What a child opens to pass the gate: envd's memfd as the child sees it."""
        return f"/proc/self/fd/{self._memfd}"

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer the gate from ``loop`` (call on the loop's thread, before any spawn)."""
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._fan, self._on_events)

    def _on_events(self) -> None:
        try:
            data = os.read(self._fan, 4096)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            length, version, _, _, _, fd, pid = _EVENT.unpack_from(data, offset)
            if version != _METADATA_VERSION or length < _EVENT.size:
                _log.error("spawn_gate.bad_event", version=version, length=length)
                return
            offset += length
            if fd < 0:
                continue
            response = _FAN_ALLOW
            try:
                self._place(pid)
            except OSError as err:
                if err.errno != errno.ESRCH:  # a child killed at the gate needs no place
                    response = _FAN_DENY
                    self.denied += 1
                    _log.error("spawn_gate.place_failed", pid=pid, error=str(err))
            try:
                os.write(self._fan, _RESPONSE.pack(fd, response))
            finally:
                os.close(fd)

    def close(self) -> None:
        """Stop answering; processes still waiting are let through by the kernel."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fan)
            self._loop = None
        for fd in (self._fan, self._memfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fan = self._memfd = -1
