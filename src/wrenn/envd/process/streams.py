"""The standard streams of a process about to start: pipes (stdin optional) or one
pseudo-terminal, envd's ends non-blocking, the child's ends closed once the child has them."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from wrenn.envd.process.launch import LaunchSpec
from wrenn.envd.process.posix_spawn import FileActions


def _above_stdio(fd: int) -> int:
    """``fd``, moved to 3 or above should envd's own standard streams be closed."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def close_quietly(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class Streams:
    """Opened by :meth:`open`; the child's ends go to the child (file actions or Popen
    arguments), envd's ends to the process handle."""

    def __init__(self) -> None:
        self.stdin_fd: int | None = None
        self.stdout_fd: int | None = None
        self.stderr_fd: int | None = None
        self.pty_fd: int | None = None
        #: The child's stdin, stdout, stderr (``None`` stdin: /dev/null); for a PTY all three
        #: are the terminal's slave end.
        self.child: tuple[int | None, int, int] = (None, -1, -1)
        self.pty_slave: int | None = None
        self._ours: list[int] = []
        self._theirs: list[int] = []

    @classmethod
    def open(cls, spec: LaunchSpec) -> Streams:
        streams = cls()
        try:
            streams._open(spec)
        except BaseException:
            streams.close_ours()
            streams.close_theirs()
            raise
        return streams

    def _pair(self) -> tuple[int, int]:
        read, write = os.pipe()
        return _above_stdio(read), _above_stdio(write)

    def _open(self, spec: LaunchSpec) -> None:
        if spec.pty is not None:
            master, slave = os.openpty()
            self._ours.append(master)
            slave = _above_stdio(slave)
            self._theirs.append(slave)
            spec.pty.apply(master)
            self.pty_fd = master
            self.pty_slave = slave
            self.child = (slave, slave, slave)
        else:
            out_r, out_w = self._pair()
            self._ours.append(out_r)
            self._theirs.append(out_w)
            err_r, err_w = self._pair()
            self._ours.append(err_r)
            self._theirs.append(err_w)
            self.stdout_fd, self.stderr_fd = out_r, err_r
            stdin: int | None = None
            if spec.stdin:
                in_r, in_w = self._pair()
                self._ours.append(in_w)
                self._theirs.append(in_r)
                stdin, self.stdin_fd = in_r, in_w
            self.child = (stdin, out_w, err_w)
        for fd in self._ours:
            os.set_blocking(fd, False)

    def add_to(self, actions: FileActions) -> None:
        """File actions giving the child its streams. A terminal is opened anew rather than
        inherited: the session leader opening it makes it its controlling terminal."""
        if self.pty_slave is not None:
            actions.open(0, f"/proc/self/fd/{self.pty_slave}", os.O_RDWR)
            actions.dup2(0, 1)
            actions.dup2(0, 2)
            return
        stdin, stdout, stderr = self.child
        if stdin is None:
            actions.open(0, os.devnull, os.O_RDONLY)
        else:
            actions.dup2(stdin, 0)
        actions.dup2(stdout, 1)
        actions.dup2(stderr, 2)

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        """Around starting the child: the child's ends are closed afterwards whatever
        happened, envd's too should the start fail."""
        try:
            yield
        except BaseException:
            self.close_ours()
            raise
        finally:
            self.close_theirs()

    def close_ours(self) -> None:
        close_quietly(*self._ours)
        self._ours.clear()

    def close_theirs(self) -> None:
        close_quietly(*self._theirs)
        self._theirs.clear()
