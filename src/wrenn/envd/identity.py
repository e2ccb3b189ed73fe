"""Filesystem operations performed with the requesting user's identity.

The kernel checks file permissions against a thread's *filesystem* credentials (fsuid, fsgid
and the supplementary groups), and creates files owned by them. Each of those is stored per
thread. glibc's ``setgroups``/``setfsuid`` wrappers and Python's ``os.setgroups`` broadcast
every change to all threads of the process (the ``SIGSETXID`` dance), so this module calls the
raw syscalls through ``syscall(2)``: only the calling thread changes.

Invariant: every thread of :data:`EXECUTOR` holds envd's own identity (root) whenever it is
not inside :func:`acting_as`. ``acting_as`` checks the invariant before switching, switches
the calling thread only, and switches back in ``finally``; a thread that cannot be switched
back is never handed another job (the process aborts instead of serving requests with a
wrong identity).

Only path-based calls need the switch (open, mkdir, rename, unlink, stat...): reading or
writing through a descriptor that was opened as the user needs no further checks, so bulk
I/O on such descriptors may run on any thread.

When envd itself is not root (a developer machine), it can act only as its own user; asking
for anyone else is ``permission_denied``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from wrenn import log
from wrenn.core.errors import Internal, PermissionDenied
from wrenn.envd.users import User

_log = log.get(__name__)
P = ParamSpec("P")
T = TypeVar("T")

#: syscall numbers of setgroups, setfsuid and setfsgid per architecture.
_SYSCALLS: dict[str, tuple[int, int, int]] = {
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
}
_SYS_SETGROUPS, _SYS_SETFSUID, _SYS_SETFSGID = _SYSCALLS[platform.machine()]
_UNCHANGED = 0xFFFFFFFF  # (uid_t)-1: setfsuid/setfsgid report the current value

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

#: Worker threads for operations that switch identity. Sized for concurrent requests of a
#: sandbox; each job is short (one or a few syscalls) or bounded by the file system.
EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="envd-fs")


def _setfsuid(uid: int) -> int:
    return int(_syscall(_SYS_SETFSUID, ctypes.c_uint(uid)))


def _setfsgid(gid: int) -> int:
    return int(_syscall(_SYS_SETFSGID, ctypes.c_uint(gid)))


def _setgroups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _syscall(_SYS_SETGROUPS, ctypes.c_size_t(len(groups)), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def current() -> tuple[int, int, tuple[int, ...]]:
    """The calling thread's filesystem uid, gid and supplementary groups."""
    uid = _setfsuid(_UNCHANGED)
    gid = _setfsgid(_UNCHANGED)
    return uid, gid, tuple(sorted(os.getgroups()))


def _switch(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Set this thread's filesystem identity and verify it took effect. Groups and gid go
    first: changing them needs CAP_SETGID, which a non-root fsuid does not drop, but doing
    them while still root keeps the order obviously safe."""
    _setgroups(groups)
    _setfsgid(gid)
    _setfsuid(uid)
    if _setfsuid(_UNCHANGED) != uid or _setfsgid(_UNCHANGED) != gid:
        raise OSError(f"could not switch filesystem identity to {uid}:{gid}")


_BASELINE = current()


@contextlib.contextmanager
def acting_as(user: User) -> Iterator[None]:
    """Run the body with ``user``'s filesystem identity on the calling thread."""
    base_uid, base_gid, base_groups = _BASELINE
    if current() != _BASELINE:
        raise Internal("worker thread does not hold envd's identity")
    if base_uid != 0 and user.uid != base_uid:
        raise PermissionDenied(f"envd runs unprivileged and cannot act as user {user.name}")
    if (user.uid, user.gid, user.groups) == _BASELINE:
        yield
        return
    try:
        _switch(user.uid, user.gid, user.groups)
    except OSError as err:
        _restore_or_abort(base_uid, base_gid, base_groups)
        raise Internal(f"cannot act as user {user.name}") from err
    try:
        yield
    finally:
        _restore_or_abort(base_uid, base_gid, base_groups)


def _restore_or_abort(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    try:
        _setfsuid(uid)
        _switch(uid, gid, groups)
    except OSError:
        _log.critical("identity.restore_failed", uid=uid, gid=gid)
        os.abort()


def _call_as(user: User, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    with acting_as(user):
        return fn(*args, **kwargs)


async def run_as(user: User, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the blocking ``fn`` on a worker thread acting as ``user``; OSErrors propagate
    unchanged for the caller to map with the path it knows."""
    loop = asyncio.get_running_loop()
    call = functools.partial(_call_as, user, fn, *args, **kwargs)
    return await loop.run_in_executor(EXECUTOR, call)
