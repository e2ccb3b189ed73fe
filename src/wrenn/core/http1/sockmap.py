"""Moving a body from one TCP socket to another inside the kernel: a BPF sockmap redirect, so
no relay process touches its bytes (``wire.move`` uses it, when enabled, for long response
bodies from a peer on this host; from one elsewhere it splices them in batches).

How: one verdict program (``BPF_PROG_TYPE_SK_SKB``) is attached to a sockhash of *sources*.
Every segment a source receives runs it, keyed by the source's socket cookie: while the body
offset it reaches stays within the *limit*, it redirects the segment to the *target* kept
under the same cookie in a second sockhash; the kernel sends it out there (``skb_send_sock``,
from a workqueue, which queues without bound). The relay keeps the limit a window ahead of
what the target has taken (never past the body's end). A segment that would pass it
*spills*: it and every one after it stay with the source (in its BPF queue, which the kernel
charges to the connection, so its peer slows down), and once the target has taken all that
was redirected, the relay reads them and passes them on, then names the offset it reached:
a segment starting exactly there is redirected again. So a reader that falls behind holds at
most a window in the kernel and the relay copies only what arrived while it caught up; a
peer sending past the body it announced is read (and refused) by the relay, never passed
on. The program drops nothing.

Invariants (each one keeps the byte stream whole):
- a source goes into the map only with nothing of it partly read: the caller's last read of
  it came back short (it emptied the queue; segments arriving after stay whole). A segment
  read in part would be redirected whole, its first bytes twice;
- segments that arrived before the source went into the map are handed to the verdict by a
  nudge (``SO_RCVLOWAT``, which calls the socket's data-ready hook);
- a source leaves the map only while no segment can be on its way to the verdict: once its
  body is all out (nothing more is asked of its peer), or when the exchange is abandoned (a
  segment arriving while a socket leaves the map can be dropped by the kernel);
- a spilled source is read with ``recv`` (its bytes wait in the socket's BPF queue, which
  ``splice`` does not see), only once everything before the spill is out, and redirecting
  starts again only at the offset the relay has read and passed on up to;
- nothing else is written to the target while segments are redirected to it.

Needs CAP_BPF and CAP_NET_ADMIN (root); ``Unavailable`` otherwise, and the caller copies.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct
import threading
from collections.abc import Sequence

_SYSCALL = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_ATTR_BYTES = 128

# bpf(2) commands, map, program and attach types (include/uapi/linux/bpf.h).
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _PROG_ATTACH = 0, 1, 2, 3, 5, 8
_MAP_HASH, _MAP_SOCKHASH = 1, 18
_PROG_SK_SKB = 14
_ATTACH_STREAM_VERDICT = 5
_HELPER_MAP_LOOKUP, _HELPER_SOCKET_COOKIE, _HELPER_REDIRECT_HASH = 1, 46, 72
_PSEUDO_MAP_FD = 1
_SK_PASS = 1
#: Set in a source's spill offset while a spill is in force.
SPILLED = 1 << 63

#: Concurrent redirects per process (entries of each map).
MAX_REDIRECTS = 256

_SO_COOKIE = 57
_TCP_INFO = 11
_SIOCOUTQ, _SIOCINQ = 0x5411, 0x541B
#: struct tcp_info: tcpi_state (u8) at 0, tcpi_bytes_acked and tcpi_bytes_received (u64).
_STATE_AT, _ACKED_AT, _RECEIVED_AT, _TCP_INFO_BYTES = 0, 120, 128, 136
_ESTABLISHED, _CLOSE_WAIT = 1, 8


class Unavailable(Exception):
    """This body cannot be redirected; ``lasting``: nothing can be here (no BPF sockmap in
    this kernel, or no permission to load programs), else only these sockets (not TCP, or
    every map entry taken)."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    if _SYSCALL is None:
        raise OSError(errno.ENOSYS, "bpf(2) is not known on this architecture")
    buf = ctypes.create_string_buffer(attr, _ATTR_BYTES)
    result = int(_libc.syscall(_SYSCALL, ctypes.c_int(cmd), buf, ctypes.c_uint(_ATTR_BYTES)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


# --- the program ---------------------------------------------------------------------------

#: One instruction (``_op``), a map's address into a register (``_map``, two slots), a
#: conditional jump to a label (``_jump``) or a label.
_Line = bytes | tuple[int, int, int, str] | str


def _op(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _map(reg: int, fd: int) -> bytes:
    return _op(0x18, reg, _PSEUDO_MAP_FD, 0, fd) + _op(0, 0, 0, 0, 0)


def _jump(code: int, dst: int, src: int, label: str) -> tuple[int, int, int, str]:
    return (code, dst, src, label)


def _assemble(lines: Sequence[_Line]) -> bytes:
    """Instructions with their jumps resolved (an offset counts 8-byte slots after the jump)."""
    at: dict[str, int] = {}
    slot = 0
    for line in lines:
        if isinstance(line, str):
            at[line] = slot
        else:
            slot += len(line) // 8 if isinstance(line, bytes) else 1
    out, slot = [], 0
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
            slot += len(line) // 8
        elif isinstance(line, tuple):
            code, dst, src, label = line
            slot += 1
            out.append(_op(code, dst, src, at[label] - slot))
    return b"".join(out)


_MOV_REG, _MOV_IMM, _ADD_IMM, _ADD_REG, _OR_REG, _LSH_IMM = 0xBF, 0xB7, 0x07, 0x0F, 0x4F, 0x67
_LOAD_W, _LOAD_DW, _STORE_DW = 0x61, 0x79, 0x7B
_CALL, _EXIT, _JEQ_IMM, _JNE_REG, _JGT_REG = 0x85, 0x95, 0x15, 0x5D, 0x2D
_FP = 10  # the frame pointer


def _verdict(limits: int, progress: int, targets: int) -> bytes:
    """The verdict, in the eBPF instruction set. r1: the segment (``struct __sk_buff``, its
    ``len`` at 0); r6-r9 keep their values across helper calls. Per source, ``limits`` holds
    what the relay sets (the limit, the offset to resume at) and ``progress`` what the
    program keeps (the offset a spill began at with ``SPILLED`` set, else 0; the offset
    reached), both in bytes of the body."""

    def lookup(map_fd: int) -> list[_Line]:
        return [
            _map(1, map_fd),
            _op(_MOV_REG, 2, _FP),
            _op(_ADD_IMM, 2, 0, 0, -8),  # r2 = &cookie
            _op(_CALL, imm=_HELPER_MAP_LOOKUP),
            _jump(_JEQ_IMM, 0, 0, "pass"),  # no entry: leave the segment with its socket
        ]

    return _assemble(
        [
            _op(_MOV_REG, 6, 1),
            _op(_CALL, imm=_HELPER_SOCKET_COOKIE),
            _op(_STORE_DW, _FP, 0, -8),  # cookie on the stack
            *lookup(limits),
            _op(_LOAD_DW, 7, 0, 0),  # r7 = limit
            _op(_LOAD_DW, 9, 0, 8),  # r9 = resume at
            *lookup(progress),
            _op(_MOV_REG, 8, 0),  # r8 = &progress
            _op(_LOAD_DW, 1, 8, 8),  # r1 = where this segment starts
            _op(_LOAD_W, 2, 6, 0),
            _op(_MOV_REG, 3, 1),
            _op(_ADD_REG, 3, 2),  # r3 = where it ends
            _op(_STORE_DW, 8, 3, 8),  # every segment counts (one of a socket at a time)
            _op(_LOAD_DW, 4, 8, 0),
            _jump(_JEQ_IMM, 4, 0, "redirecting"),
            _jump(_JNE_REG, 1, 9, "pass"),  # spilled, and the relay has not read up to here
            _op(_MOV_IMM, 5, 0, 0, 0),
            _op(_STORE_DW, 8, 5, 0),  # it has: redirect again
            "redirecting",
            _jump(_JGT_REG, 3, 7, "spill"),
            _op(_MOV_REG, 1, 6),
            _map(2, targets),
            _op(_MOV_REG, 3, _FP),
            _op(_ADD_IMM, 3, 0, 0, -8),
            _op(_MOV_IMM, 4, 0, 0, 0),  # out of the target, not into it
            _op(_CALL, imm=_HELPER_REDIRECT_HASH),
            _op(_EXIT),
            "spill",
            _op(_MOV_IMM, 2, 0, 0, 1),
            _op(_LSH_IMM, 2, 0, 0, 63),
            _op(_OR_REG, 1, 2),
            _op(_STORE_DW, 8, 1, 0),  # spilled where this segment starts
            "pass",
            _op(_MOV_IMM, 0, 0, 0, _SK_PASS),
            _op(_EXIT),
        ]
    )


class _Maps:
    """The process's maps and program, made on first use."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        try:
            self.sources = self._create(_MAP_SOCKHASH, 4, b"wrenn_sources")
            self.targets = self._create(_MAP_SOCKHASH, 4, b"wrenn_targets")
            self.limits = self._create(_MAP_HASH, 16, b"wrenn_limits")
            self.progress = self._create(_MAP_HASH, 16, b"wrenn_progress")
            code = ctypes.create_string_buffer(_verdict(self.limits, self.progress, self.targets))
            licence = ctypes.create_string_buffer(b"GPL")
            program = _bpf(
                _PROG_LOAD,
                struct.pack(
                    "IIQQIIQII16s",
                    _PROG_SK_SKB,
                    (len(code) - 1) // 8,
                    ctypes.addressof(code),
                    ctypes.addressof(licence),
                    0,  # no verifier log
                    0,
                    0,
                    0,  # kernel version: not checked for this type
                    0,
                    b"wrenn_redirect",
                ),
            )
            self.fds.append(program)
            _bpf(
                _PROG_ATTACH,
                struct.pack("IIII", self.sources, program, _ATTACH_STREAM_VERDICT, 0),
            )
        except OSError:
            for fd in self.fds:
                os.close(fd)
            raise

    def _create(self, kind: int, value_bytes: int, name: bytes) -> int:
        fd = _bpf(
            _MAP_CREATE,
            struct.pack("IIIIIII16s", kind, 8, value_bytes, MAX_REDIRECTS, 0, 0, 0, name),
        )
        self.fds.append(fd)
        return fd

    @staticmethod
    def _element(
        cmd: int, map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None
    ) -> None:
        key_buf = ctypes.create_string_buffer(key, len(key))
        value_at = 0 if value is None else ctypes.addressof(value)
        _bpf(cmd, struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(key_buf), value_at, 0))

    def update(self, map_fd: int, key: bytes, value: bytes) -> None:
        self._element(_MAP_UPDATE, map_fd, key, ctypes.create_string_buffer(value, len(value)))

    def lookup_pair(self, map_fd: int, key: bytes) -> tuple[int, int]:
        """Two u64s (zeros once the entry is gone)."""
        value = ctypes.create_string_buffer(16)
        with contextlib.suppress(FileNotFoundError):
            self._element(_MAP_LOOKUP, map_fd, key, value)
        first, second = struct.unpack("QQ", value.raw)
        return int(first), int(second)

    def delete(self, map_fd: int, key: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):  # a closed socket leaves by itself
            self._element(_MAP_DELETE, map_fd, key, None)


_maps: _Maps | None = None
_maps_failed: str | None = None
_lock = threading.Lock()


def _the_maps() -> _Maps:
    global _maps, _maps_failed
    with _lock:
        if _maps is None:
            if _maps_failed is not None:
                raise Unavailable(_maps_failed, lasting=True)
            try:
                _maps = _Maps()
            except OSError as err:
                _maps_failed = f"cannot load the redirect program: {err.strerror}"
                raise Unavailable(_maps_failed, lasting=True) from err
        return _maps


# --- the sockets' counts -------------------------------------------------------------------


def _info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)


def _queued(sock: socket.socket, request: int) -> int:
    value = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), request, value)
    return value[0]


def _counted(sock: socket.socket, at: int, queue: int, sign: int) -> tuple[int, bytes]:
    """A byte count of ``tcp_info`` plus (or minus) a queue's length, read consistently (the
    count did not move while the queue was read), and the ``tcp_info`` it came from."""
    while True:
        first = struct.unpack_from("Q", _info(sock), at)[0]
        queued = _queued(sock, queue)
        info = _info(sock)
        if struct.unpack_from("Q", info, at)[0] == first:
            return int(first + sign * queued), info


def written(sock: socket.socket) -> int:
    """Bytes ever handed to ``sock`` for sending (acknowledged, plus still in its queue)."""
    return _counted(sock, _ACKED_AT, _SIOCOUTQ, 1)[0]


def consumed(sock: socket.socket) -> int:
    """Bytes ever received by ``sock`` and taken out of its queue."""
    return _counted(sock, _RECEIVED_AT, _SIOCINQ, -1)[0]


def _state(sock: socket.socket) -> int:
    return _info(sock)[_STATE_AT]


class Redirect:
    """``n`` bytes of ``source`` (nothing of it partly read) sent out of ``target`` by the
    kernel, up to ``limit`` for now (``allow`` moves it on). Follow it with ``progress`` and
    ``sent``; ``close`` always.

    Offsets count bytes of the body from where the redirect began. A spill at offset P leaves
    P onwards with the source; once ``sent`` reaches P the relay reads and passes on what is
    there, and ``allow(..., resume_at)`` with the offset it reached lets the program redirect
    again from a segment starting exactly there (one starting later means more arrived
    meanwhile: the relay reads that too, and tries again)."""

    def __init__(self, source: socket.socket, target: socket.socket, n: int, limit: int) -> None:
        for sock in (source, target):
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise Unavailable("only TCP sockets are redirected", lasting=False)
        maps = _the_maps()
        self._maps, self.source, self.target, self.n = maps, source, target, n
        self._key = source.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8)
        self._base = written(target)
        self._end = consumed(source) + n
        self._limits = (min(limit, n), 0)
        self._entries: list[int] = []
        try:
            for map_fd, value in (
                (maps.limits, struct.pack("QQ", *self._limits)),
                (maps.progress, struct.pack("QQ", 0, 0)),
                (maps.targets, struct.pack("i", target.fileno())),
                (maps.sources, struct.pack("i", source.fileno())),
            ):
                maps.update(map_fd, self._key, value)
                self._entries.append(map_fd)
        except OSError as err:
            self.close()
            message = f"cannot redirect this socket: {err.strerror}"
            raise Unavailable(message, lasting=False) from err
        # Segments queued before the source went into the map: hand them to the verdict.
        source.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def progress(self) -> tuple[int, int | None]:
        """The offset the source's segments have reached, and where the spill in force (if
        any) began."""
        spill, reached = self._maps.lookup_pair(self._maps.progress, self._key)
        return reached, (spill & ~SPILLED if spill & SPILLED else None)

    def sent(self) -> tuple[int, bool]:
        """Bytes of the body in the target's send queue or beyond (the relay's own too), and
        whether the target can still send (its peer may have closed its own side only): one
        reading of the target's counts."""
        count, info = _counted(self.target, _ACKED_AT, _SIOCOUTQ, 1)
        return count - self._base, info[_STATE_AT] in (_ESTABLISHED, _CLOSE_WAIT)

    def allow(self, limit: int, resume_at: int) -> None:
        """Let segments be redirected up to ``limit`` (never past the body's end), and again
        from ``resume_at`` after a spill."""
        limits = (max(min(limit, self.n), self._limits[0]), resume_at)
        if limits != self._limits:
            self._maps.update(self._maps.limits, self._key, struct.pack("QQ", *limits))
            self._limits = limits

    def overrun(self) -> bool:
        """The source's peer sent past the body."""
        received = int(struct.unpack_from("Q", _info(self.source), _RECEIVED_AT)[0])
        return received > self._end

    def source_open(self) -> bool:
        """The source's peer may still send (it has not closed its side)."""
        return _state(self.source) == _ESTABLISHED

    def close(self) -> None:
        """Take both sockets out of the maps, the source first."""
        for map_fd in reversed(self._entries):
            self._maps.delete(map_fd, self._key)
        self._entries.clear()
