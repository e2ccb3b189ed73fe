"""Keep QEMU's guest RAM in small pages: a seccomp filter that turns ``madvise(MADV_HUGEPAGE)``
into a no-op for the QEMU process.

QEMU advises ``MADV_HUGEPAGE`` on every RAM block it maps. For file-backed guest RAM on a
filesystem with large folios (XFS, where the agent keeps memory images), the kernel then reads
and maps a whole 2 MiB folio on the first touch of any page in it, whatever the device's
readahead setting. A restored 512 MiB guest that answers one request has touched a few hundred
scattered pages, yet maps ~45 MiB and pulls ~160 MiB into the page cache: memory every idle
sandbox holds. Without the advice a touch maps the pages touched (plus the kernel's usual
fault-around of pages already cached).

The filter is installed in the child between fork and exec (``preexec_fn``) and inherited by
QEMU through ``exec``. It answers that one call with success without running it, and lets every
other system call through. The program is assembled once in the parent; the child only makes
two ``prctl`` calls.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
from collections.abc import Callable

#: linux/audit.h
_AUDIT_ARCH_X86_64 = 0xC000003E
#: asm/unistd_64.h
_NR_MADVISE = 28
#: asm-generic/mman-common.h
_MADV_HUGEPAGE = 14
#: linux/prctl.h, linux/seccomp.h
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000  # | errno; errno 0: the call "succeeds" without running
#: linux/filter.h: classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
#: Offsets in struct seccomp_data: nr, arch, instruction_pointer, args[6].
_NR, _ARCH, _ARG2_LOW = 0, 4, 16 + 2 * 8


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _program() -> bytes:
    return b"".join(
        [
            _insn(_LD_W_ABS, 0, 0, _ARCH),
            _insn(_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),  # another ABI: allow
            _insn(_LD_W_ABS, 0, 0, _NR),
            _insn(_JEQ_K, 0, 3, _NR_MADVISE),
            # The advice is an int: the low 32 bits of the third argument hold it.
            _insn(_LD_W_ABS, 0, 0, _ARG2_LOW),
            _insn(_JEQ_K, 0, 1, _MADV_HUGEPAGE),
            _insn(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | 0),
            _insn(_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        ]
    )


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported() -> bool:
    """The filter is written for Linux on x86-64."""
    return sys.platform == "linux" and os.uname().machine == "x86_64"


@functools.cache
def installer() -> Callable[[], None]:
    """A ``preexec_fn`` installing the filter in the child. Everything it needs is made here,
    in the parent; a failure in the child fails the spawn (``SubprocessError``)."""
    program = ctypes.create_string_buffer(_program())
    fprog = _SockFprog(len(program.raw) // 8, ctypes.addressof(program))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    fprog_ptr = ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p)

    def install() -> None:
        # Keep the buffers alive as long as the closure is.
        _ = (program, fprog)
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog_ptr, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")

    return install
