"""Starting a process by forking envd: the fallback where the spawn gate is unavailable
(envd not root, no fanotify permission events, a C library without the needed
``posix_spawn`` file actions) or turned off.

``subprocess.Popen`` forks (a ``preexec_fn`` rules out ``vfork``) and, between fork and exec,
runs :meth:`_ChildSetup.__call__` while still root, in this order: unblock signals and set
every disposition to its default (an ignored signal would survive exec), take the
PTY as controlling terminal (``setsid`` has already made it a session leader), join the user
cgroup, raise its OOM score, then drop to the user's groups, gid and uid. Forking copies
envd's page tables, so this costs a few milliseconds more per process than the gate.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import termios
from collections.abc import Sequence

from wrenn.envd.process.launch import LaunchSpec
from wrenn.envd.process.streams import Streams
from wrenn.envd.users import User

#: oom_score_adj of user processes: the kernel's OOM killer picks them before envd.
USER_OOM_SCORE_ADJ = 100

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_RT_SIGACTION = 13  # x86_64
#: A zeroed ``struct kernel_sigaction``: handler SIG_DFL, no flags, restorer or mask.
_DEFAULT_ACTION = ctypes.create_string_buffer(32)
_SIGSET_BYTES = 8


def _default_dispositions() -> None:
    """Every signal but SIGKILL/SIGSTOP back to SIG_DFL, with the raw syscall: libc's wrappers
    refuse the real-time signals it reserves, which may be ignored too."""
    for sig in range(1, 65):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            _libc.syscall(_SYS_RT_SIGACTION, sig, _DEFAULT_ACTION, None, _SIGSET_BYTES)


class _ChildSetup:
    """Runs in the forked child before exec (see the module docstring). Only async-signal
    tolerant work: syscalls on values prepared by the parent."""

    def __init__(self, user: User, pty: bool, cgroup_fds: Sequence[int]) -> None:
        self.uid = user.uid
        self.gid = user.gid
        self.groups = list(user.groups)
        self.switch = os.geteuid() == 0 and (
            (user.uid, user.gid) != (os.geteuid(), os.getegid())
            or set(user.groups) != set(os.getgroups())
        )
        self.pty = pty
        self.cgroup_fds = tuple(cgroup_fds)
        self.oom = str(USER_OOM_SCORE_ADJ).encode()

    def __call__(self) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _default_dispositions()
        if self.pty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        for fd in self.cgroup_fds:
            os.write(fd, b"0")
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, self.oom)
            finally:
                os.close(fd)
        except OSError:
            pass
        if self.switch:
            os.setgroups(self.groups)
            os.setgid(self.gid)
            os.setuid(self.uid)


def spawn_forked(
    spec: LaunchSpec, streams: Streams, cgroup_fds: Sequence[int]
) -> subprocess.Popen[bytes]:
    """Fork and exec ``spec`` with ``streams`` (blocking: call it on a worker thread)."""
    stdin, stdout, stderr = streams.child
    return subprocess.Popen(
        list(spec.argv),
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=spec.cwd,
        env=spec.env,
        start_new_session=True,
        preexec_fn=_ChildSetup(spec.user, spec.pty is not None, cgroup_fds),
        close_fds=True,
    )
