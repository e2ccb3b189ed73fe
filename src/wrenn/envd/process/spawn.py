"""Turning a :class:`LaunchSpec` into a running child with its identity, session, controlling
terminal, cgroup and OOM score in place before its program starts.

Two ways, same result:

* **gated** (default where it works): ``posix_spawn`` from a dedicated thread that acts as the
  user, the child held at the spawn gate until envd has put it in the user cgroup (see
  ``gated``, ``gate``, ``credentials``). No fork of envd, so starting a process costs about
  what the exec costs.
* **forked**: ``subprocess.Popen`` with a ``preexec_fn`` that sets everything up in the child
  (see ``forked``): when envd is not root, the kernel lacks fanotify permission events, the C
  library lacks ``posix_spawn_file_actions_addclosefrom_np`` (glibc < 2.34), the spawning
  thread cannot have a working directory of its own, or ``WRENN_ENVD_FAST_SPAWN`` is off.

Either way every process leads its own session and process group (signals sent to the group
reach all descendants that did not leave it), starts with no signal blocked, in its working
directory entered as root, and only when the user may execute the program
(``invalid_argument`` otherwise). Starts run on a few dedicated threads ("envd-spawn"), so
one whose exec hangs (a binary on a stuck file system) does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from wrenn import log
from wrenn.core.errors import Internal, InvalidArgument, ResourceExhausted
from wrenn.envd.process import credentials, posix_spawn
from wrenn.envd.process.forked import USER_OOM_SCORE_ADJ, spawn_forked
from wrenn.envd.process.gate import SpawnGate
from wrenn.envd.process.gated import GatedChild, GateDenied, spawn_gated
from wrenn.envd.process.launch import LaunchSpec
from wrenn.envd.process.streams import Streams

_log = log.get(__name__)

_CLONE_FS = 0x0000_0200
#: Threads starting processes at once (started as needed).
SPAWN_THREADS = 4
_libc = ctypes.CDLL(None, use_errno=True)


class Child(Protocol):
    """What envd needs of a started child (``subprocess.Popen`` is one)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


@dataclass(slots=True)
class Spawned:
    """A started child and envd's ends of its standard streams."""

    child: Child
    pidfd: int
    stdin_fd: int | None
    stdout_fd: int | None
    stderr_fd: int | None
    pty_fd: int | None


def _start_error(cmd: str, err: OSError) -> Exception:
    if isinstance(err, FileNotFoundError):
        return InvalidArgument(f"cannot execute {cmd!r}: no such file")
    if isinstance(err, PermissionError):
        return InvalidArgument(f"cannot execute {cmd!r}: permission denied")
    if err.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
        return ResourceExhausted(f"cannot start process: {err.strerror}")
    return InvalidArgument(f"cannot execute {cmd!r}: {err.strerror}")


def _enter(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError as err:
        raise InvalidArgument(f"cwd '{cwd}' cannot be entered: {err.strerror}") from err


class Spawner:
    """Starts user processes (see the module docstring). ``cgroup_fds`` are the user groups'
    ``cgroup.procs`` descriptors (see ``cgroups``)."""

    def __init__(self, cgroup_fds: Sequence[int] = (), *, fast: bool = True) -> None:
        self._cgroup_fds = tuple(cgroup_fds)
        self._fast = fast
        self._gate: SpawnGate | None = None
        self._decided = False
        self._base = credentials.Ids.current()
        self._threads = ThreadPoolExecutor(
            max_workers=SPAWN_THREADS, thread_name_prefix="envd-spawn"
        )
        self._per_thread = threading.local()

    @property
    def gated(self) -> bool:
        """Whether processes are started through the gate (known after the first start)."""
        return self._gate is not None

    def _decide(self) -> None:
        """Pick the way of starting processes, once, on the event loop thread."""
        self._decided = True
        reason: str | None = None
        if not self._fast:
            reason = "turned off"
        elif self._base.uids[1] != 0:
            reason = "envd is not root"
        elif missing := posix_spawn.missing_symbols():
            reason = f"C library lacks {', '.join(missing)}"
        else:
            try:
                self._gate = SpawnGate.open(self._place)
            except OSError as err:
                reason = f"no spawn gate: {err}"
        if self._gate is not None:
            self._gate.attach(asyncio.get_running_loop())
            _log.debug("process.spawn_mode", mode="gated")
        else:
            _log.info("process.spawn_mode", mode="forked", reason=reason)

    def _place(self, pid: int) -> None:
        """Put a child held at the gate in the user cgroup(s) and raise its OOM score."""
        value = str(pid).encode()
        for fd in self._cgroup_fds:
            os.write(fd, value)
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(USER_OOM_SCORE_ADJ).encode())
        finally:
            os.close(fd)

    def spawn(self, spec: LaunchSpec) -> asyncio.Future[Spawned]:
        """Start ``spec`` (call on the event loop thread). Cancelling the returned future does
        not stop the start: shield it, and adopt a child born after the caller stopped
        waiting."""
        if not self._decided:
            self._decide()
        return asyncio.get_running_loop().run_in_executor(self._threads, self._spawn, spec)

    def _own_cwd(self) -> bool:
        """Give the calling spawning thread a working directory of its own
        (``unshare(CLONE_FS)``), once; a child created by ``posix_spawn`` starts in it. False
        where that fails."""
        private: bool | None = getattr(self._per_thread, "cwd_private", None)
        if private is None:
            private = self._per_thread.cwd_private = _libc.unshare(_CLONE_FS) == 0
            if not private:
                err = ctypes.get_errno()
                _log.warning("process.spawn_mode", mode="forked", reason=os.strerror(err))
        return private

    def _spawn(self, spec: LaunchSpec) -> Spawned:
        gate = self._gate if self._gate is not None and self._own_cwd() else None
        try:
            if gate is not None:
                child, streams = self._start_gated(spec, gate)
            else:
                child, streams = self._start_forked(spec)
        except GateDenied:
            raise Internal("could not place the process in the user cgroup") from None
        except subprocess.SubprocessError as err:
            raise Internal("process setup between fork and exec failed") from err
        except OSError as err:
            raise _start_error(spec.argv[0], err) from err
        return self._watch(child, streams)

    def _start_gated(self, spec: LaunchSpec, gate: SpawnGate) -> tuple[Child, Streams]:
        _enter(spec.cwd)  # as root, like the forked path's chdir
        try:
            with credentials.acting_as(self._base, spec.user):
                streams = Streams.open(spec)
                with streams.handing_over():
                    return GatedChild(spawn_gated(spec, streams, gate)), streams
        finally:
            os.chdir("/")

    def _start_forked(self, spec: LaunchSpec) -> tuple[Child, Streams]:
        with credentials.acting_as(self._base, spec.user):
            streams = Streams.open(spec)
        with streams.handing_over():
            return spawn_forked(spec, streams, self._cgroup_fds), streams

    @staticmethod
    def _watch(child: Child, streams: Streams) -> Spawned:
        """Open the child's pidfd; a child that cannot be watched is killed."""
        try:
            pidfd = os.pidfd_open(child.pid)
        except OSError as err:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            streams.close_ours()
            raise ResourceExhausted(f"cannot watch the new process: {err.strerror}") from err
        return Spawned(
            child, pidfd, streams.stdin_fd, streams.stdout_fd, streams.stderr_fd, streams.pty_fd
        )

    async def aclose(self) -> None:
        """Finish the starts in progress, then close the gate."""
        await asyncio.to_thread(self._threads.shutdown, wait=True)
        if self._gate is not None:
            self._gate.close()
            self._gate = None
