"""glibc's ``posix_spawn`` through ctypes, with the file actions envd needs.

``os.posix_spawn`` cannot close inherited descriptors, and it holds the GIL while the child
runs up to its exec, so nothing else in envd could run meanwhile (the spawn gate needs the
event loop then). A ctypes call releases the GIL. glibc creates the child with
``CLONE_VM | CLONE_VFORK``: no page tables are copied, the calling thread waits until the child
has exec'd (or failed), and a failure anywhere in the child (a file action, the exec) is
returned as an errno after glibc reaped the child.

The child inherits the calling thread's credentials and working directory, signal dispositions
are reset to their defaults and its signal mask is set as asked, ``setsid`` runs before the file
actions (so opening a terminal without ``O_NOCTTY`` makes it the controlling terminal), then the
file actions run in order, then the exec.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence

#: Flags of ``posix_spawnattr_setflags`` (glibc's values).
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80

#: Opaque glibc types, allocated generously (glibc: 336 and 80 bytes; sigset_t 128).
_ATTR_BYTES = 1024
_ACTIONS_BYTES = 1024
_SIGSET_BYTES = 128

_libc = ctypes.CDLL(None, use_errno=True)
_REQUIRED = (
    "posix_spawn",
    "posix_spawnattr_init",
    "posix_spawnattr_destroy",
    "posix_spawnattr_setflags",
    "posix_spawnattr_setsigmask",
    "posix_spawnattr_setsigdefault",
    "posix_spawn_file_actions_init",
    "posix_spawn_file_actions_destroy",
    "posix_spawn_file_actions_addopen",
    "posix_spawn_file_actions_adddup2",
    "posix_spawn_file_actions_addclosefrom_np",
    "sigemptyset",
)


def missing_symbols() -> list[str]:
    """The libc functions this module needs that the C library lacks (glibc < 2.34)."""
    return [name for name in _REQUIRED if not hasattr(_libc, name)]


def _ok(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


class FileActions:
    """The child's file actions, run in the order added."""

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(_ACTIONS_BYTES)
        self._keep: list[bytes] = []  # paths must outlive the spawn
        _ok(_libc.posix_spawn_file_actions_init(self._buf), "file actions")

    def open(self, fd: int, path: str, flags: int, mode: int = 0) -> None:
        raw = os.fsencode(path)
        self._keep.append(raw)
        _ok(
            _libc.posix_spawn_file_actions_addopen(
                self._buf, fd, raw, ctypes.c_int(flags), ctypes.c_uint(mode)
            ),
            "open action",
        )

    def dup2(self, fd: int, new_fd: int) -> None:
        _ok(_libc.posix_spawn_file_actions_adddup2(self._buf, fd, new_fd), "dup2 action")

    def close_from(self, low_fd: int) -> None:
        _ok(_libc.posix_spawn_file_actions_addclosefrom_np(self._buf, low_fd), "closefrom action")

    def destroy(self) -> None:
        _libc.posix_spawn_file_actions_destroy(self._buf)


def _cstrings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    actions: FileActions,
    *,
    setsid: bool,
) -> int:
    """Start ``path`` and return its pid once it has exec'd. The child gets every signal's
    default disposition and an empty signal mask. Raises ``OSError`` with the errno of
    whatever failed in the child."""
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    _ok(_libc.posix_spawnattr_init(attr), "spawn attributes")
    try:
        flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
        if setsid:
            flags |= POSIX_SPAWN_SETSID
        _ok(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "spawn flags")
        empty = ctypes.create_string_buffer(_SIGSET_BYTES)
        _libc.sigemptyset(empty)
        _ok(_libc.posix_spawnattr_setsigmask(attr, empty), "signal mask")
        # Every bit set, glibc's internal signals (32, 33) included: sigfillset leaves those
        # out, and glibc's child would then ignore them, which the program would inherit.
        every = ctypes.create_string_buffer(b"\xff" * _SIGSET_BYTES, _SIGSET_BYTES)
        _ok(_libc.posix_spawnattr_setsigdefault(attr, every), "default signals")
        argv_c = _cstrings([os.fsencode(a) for a in argv])
        env_c = _cstrings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()])
        pid = ctypes.c_int(0)
        result = _libc.posix_spawn(
            ctypes.byref(pid), os.fsencode(path), actions._buf, attr, argv_c, env_c
        )
        if result != 0:
            raise OSError(result, os.strerror(result))
        return pid.value
    finally:
        _libc.posix_spawnattr_destroy(attr)
