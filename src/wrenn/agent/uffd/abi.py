"""The userfaultfd kernel ABI (``linux/userfaultfd.h``) through ctypes: struct layouts, ioctl
numbers computed the way ``<asm-generic/ioctl.h>`` does, and thin calls that report errno
instead of raising where the caller must handle partial progress. x86-64 and arm64 share
the generic ioctl encoding; only the syscall number differs.

ioctl number = dir << 30 | size << 16 | type << 8 | nr, with dir READ = 2, WRITE = 1, type 0xAA:

    UFFDIO_API        _IOWR(0xAA, 0x3F, struct uffdio_api      24 bytes) = 0xC018AA3F
    UFFDIO_REGISTER   _IOWR(0xAA, 0x00, struct uffdio_register 32 bytes) = 0xC020AA00
    UFFDIO_UNREGISTER _IOR (0xAA, 0x01, struct uffdio_range    16 bytes) = 0x8010AA01
    UFFDIO_WAKE       _IOR (0xAA, 0x02, struct uffdio_range    16 bytes) = 0x8010AA02
    UFFDIO_COPY       _IOWR(0xAA, 0x03, struct uffdio_copy     40 bytes) = 0xC028AA03
    UFFDIO_ZEROPAGE   _IOWR(0xAA, 0x04, struct uffdio_zeropage 32 bytes) = 0xC020AA04

(UNREGISTER and WAKE are _IOR although the kernel reads them: a historical quirk the header
keeps.) Messages read from the fd are 32 bytes, ``struct uffd_msg``, packed: u8 event,
7 reserved bytes, then a 24-byte union (pagefault: u64 flags, u64 address, u32 ptid;
remove/unmap: u64 start, u64 end; remap: u64 from, u64 to, u64 len; fork: u32 ufd).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_IOC_WRITE = 1
_IOC_READ = 2
UFFDIO = 0xAA


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFD_API = 0xAA
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFDIO, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ioc(_IOC_READ, UFFDIO, 0x02, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x04, ctypes.sizeof(UffdioZeropage))

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0

UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0

#: Flag of the userfaultfd(2) syscall: faults from kernel-mode accesses are not delivered.
UFFD_USER_MODE_ONLY = 1

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine(), 323)

#: One ``struct uffd_msg``: event, then the three u64 words of the union.
MSG = struct.Struct("<B7xQQQ")
assert MSG.size == 32

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def userfaultfd(flags: int) -> int:
    """A new userfaultfd (``O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY`` are the flags)."""
    fd = int(_syscall(ctypes.c_long(SYS_USERFAULTFD), ctypes.c_int(flags)))
    _check(fd)
    return fd


def api(fd: int, features: int) -> tuple[int, int]:
    """Handshake UFFDIO_API asking for ``features``; returns (features, ioctls) granted."""
    request = UffdioApi(UFFD_API, features, 0)
    _check(_ioctl(fd, UFFDIO_API, ctypes.addressof(request)))
    return int(request.features), int(request.ioctls)


def register(fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
    """Register ``[start, start + length)``; returns the ioctls allowed on the range."""
    request = UffdioRegister(UffdioRange(start, length), mode, 0)
    _check(_ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(request)))
    return int(request.ioctls)


class Uffd:
    """The range ioctls on one userfaultfd, reusing one request struct each (one thread only).
    ``copy`` and ``zeropage`` return ``(bytes done, errno)``: errno 0 means all of it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = UffdioCopy()
        self._copy_ptr = ctypes.addressof(self._copy)
        self._zero = UffdioZeropage()
        self._zero_ptr = ctypes.addressof(self._zero)
        self._range = UffdioRange()
        self._range_ptr = ctypes.addressof(self._range)

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
        c = self._copy
        c.dst, c.src, c.len, c.mode, c.copy = dst, src, length, mode, 0
        if _ioctl(self.fd, UFFDIO_COPY, self._copy_ptr) == 0:
            return length, 0
        return max(int(c.copy), 0), ctypes.get_errno()

    def zeropage(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        z = self._zero
        z.range.start, z.range.len, z.mode, z.zeropage = start, length, mode, 0
        if _ioctl(self.fd, UFFDIO_ZEROPAGE, self._zero_ptr) == 0:
            return length, 0
        return max(int(z.zeropage), 0), ctypes.get_errno()

    def wake(self, start: int, length: int) -> None:
        r = self._range
        r.start, r.len = start, length
        _check(_ioctl(self.fd, UFFDIO_WAKE, self._range_ptr))
