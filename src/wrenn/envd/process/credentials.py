"""A spawning thread that temporarily holds a user's real and effective ids, so that a child it
creates with ``posix_spawn`` (which shares envd's memory until exec and runs no Python) starts
as that user without envd forking.

Linux keeps credentials per thread; glibc's ``setuid`` family and Python's ``os.setuid``
broadcast every change to all threads of the process, so this module calls the raw syscalls:
only the calling thread changes. The thread sets its groups, then its real, effective and saved
gid, then its real and effective uid to the user's while keeping the saved uid 0, which is what
lets it switch back. A child created meanwhile inherits these ids; ``execve`` then copies the
effective uid into the saved one, so the new program runs with real = effective = saved = the
user's uid, the user's groups and no capabilities, as after ``setuid``.

Invariant: outside :func:`acting_as` the thread holds envd's own ids. A thread that cannot
switch back aborts the process rather than serve another request with a wrong identity.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

from wrenn import log
from wrenn.core.errors import Internal
from wrenn.envd.users import User

_log = log.get(__name__)

#: syscall numbers of setgroups, setresuid and setresgid per architecture.
_SYSCALLS: dict[str, tuple[int, int, int]] = {
    "x86_64": (116, 117, 119),
    "aarch64": (159, 147, 149),
}
_SYS_SETGROUPS, _SYS_SETRESUID, _SYS_SETRESGID = _SYSCALLS[platform.machine()]

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _setgroups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _check(_syscall(_SYS_SETGROUPS, ctypes.c_size_t(len(groups)), array))


def _setresgid(rgid: int, egid: int, sgid: int) -> None:
    _check(_syscall(_SYS_SETRESGID, ctypes.c_uint(rgid), ctypes.c_uint(egid), ctypes.c_uint(sgid)))


def _setresuid(ruid: int, euid: int, suid: int) -> None:
    _check(_syscall(_SYS_SETRESUID, ctypes.c_uint(ruid), ctypes.c_uint(euid), ctypes.c_uint(suid)))


@dataclass(frozen=True, slots=True)
class Ids:
    """A thread's real/effective/saved uids and gids and its supplementary groups."""

    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: frozenset[int]

    @classmethod
    def current(cls) -> Ids:
        """The calling thread's ids (``getresuid`` and friends read the calling thread)."""
        return cls(os.getresuid(), os.getresgid(), frozenset(os.getgroups()))


def needs_switch(base: Ids, user: User) -> bool:
    """Whether a process for ``user`` needs other ids than envd's own ``base``."""
    return (
        base.uids != (user.uid,) * 3
        or base.gids != (user.gid,) * 3
        or base.groups != frozenset(user.groups)
    )


@contextlib.contextmanager
def acting_as(base: Ids, user: User) -> Iterator[None]:
    """Hold ``user``'s ids on the calling thread for the body (see the module docstring).
    ``base`` is envd's identity, which the thread must hold on entry and holds again after."""
    if not needs_switch(base, user):
        yield
        return
    if base.uids[1] != 0:
        raise Internal(f"envd runs unprivileged and cannot start processes as {user.name}")
    try:  # each call either takes effect or fails; switching back is verified
        _setgroups(user.groups)
        _setresgid(user.gid, user.gid, user.gid)
        _setresuid(user.uid, user.uid, 0)
    except OSError as err:
        _restore_or_abort(base)
        raise Internal(f"cannot start processes as {user.name}") from err
    try:
        yield
    finally:
        _restore_or_abort(base)


def _restore_or_abort(base: Ids) -> None:
    try:
        _setresuid(*base.uids)
        _setresgid(*base.gids)
        _setgroups(tuple(sorted(base.groups)))
        if Ids.current() != base:
            raise OSError("identity did not switch back")
    except OSError:
        _log.critical("credentials.restore_failed", uids=base.uids, gids=base.gids)
        os.abort()
