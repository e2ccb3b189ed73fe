"""Turning a validated start request into a running child: its environment, working
directory, identity, session, controlling terminal and cgroup.

The child is forked by ``subprocess.Popen`` on a worker thread. Between fork and exec it runs
:func:`_ChildSetup.__call__`, in this order, while still root: unblock signals, take the PTY
as controlling terminal (``setsid`` has already made it a session leader), join the user
cgroup, raise its OOM score, then drop to the user's groups, gid and uid. Every process
therefore leads its own session and process group, so signals sent to the group reach all of
its descendants that did not leave it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wrenn.core.errors import Internal, InvalidArgument, PermissionDenied, ResourceExhausted
from wrenn.envd.defaults import Defaults
from wrenn.envd.users import User

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm-256color"
#: oom_score_adj of user processes: the kernel's OOM killer picks them before envd.
USER_OOM_SCORE_ADJ = 100


@dataclass(frozen=True, slots=True)
class PtySize:
    cols: int
    rows: int

    def __post_init__(self) -> None:
        for name, value in (("cols", self.cols), ("rows", self.rows)):
            if not 0 < value <= 0xFFFF:
                raise InvalidArgument(f"pty {name} must be between 1 and 65535, got {value}")

    def apply(self, fd: int) -> None:
        """Set this size on the terminal behind ``fd`` (the kernel signals SIGWINCH to the
        terminal's foreground process group)."""
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", self.rows, self.cols, 0, 0))


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to fork one user process."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    user: User
    pty: PtySize | None
    stdin: bool


def environment(
    user: User, defaults: Defaults, requested: Mapping[str, str], *, pty: bool
) -> dict[str, str]:
    """PATH from envd, the user's identity variables, then /init's variables, then the
    request's (later ones win)."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": user.shell,
    }
    if pty:
        env["TERM"] = DEFAULT_TERM
    env.update(defaults.env_vars)
    env.update(requested)
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidArgument(f"invalid environment variable {key!r}")
    return env


def working_directory(requested: str | None, user: User, defaults: Defaults) -> str:
    """The absolute directory a process starts in. ``~`` expands to the user's home and a
    relative path is taken from the default workdir (else the home). Without a request the
    default workdir, else the home, else ``/`` when the home does not exist."""
    if requested:
        path = requested
        if path == "~" or path.startswith("~/"):
            path = user.home + path[1:]
        if not os.path.isabs(path):
            path = os.path.join(defaults.workdir or user.home, path)
    elif defaults.workdir:
        path = defaults.workdir
    else:
        return user.home if os.path.isdir(user.home) else "/"
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise InvalidArgument(f"cwd '{path}' does not exist")
    if not os.path.isdir(path):
        raise InvalidArgument(f"cwd '{path}' is not a directory")
    return path


def check_identity(user: User) -> None:
    """envd can start processes as anyone only when it runs as root."""
    if os.geteuid() != 0 and user.uid != os.geteuid():
        raise PermissionDenied(f"envd runs unprivileged and cannot start processes as {user.name}")


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


@dataclass(slots=True)
class Spawned:
    """A forked child and the parent's ends of its standard streams."""

    popen: subprocess.Popen[bytes]
    pidfd: int
    stdin_fd: int | None
    stdout_fd: int | None
    stderr_fd: int | None
    pty_fd: int | None


def _close_quietly(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn(spec: LaunchSpec, cgroup_fds: Sequence[int]) -> Spawned:
    """Fork and exec ``spec`` (blocking: call it on a worker thread). The parent's ends are
    non-blocking; the child's ends are closed here once the child has them."""
    setup = _ChildSetup(spec.user, spec.pty is not None, cgroup_fds)
    ours: list[int] = []
    theirs: list[int] = []
    try:
        if spec.pty is not None:
            master, slave = os.openpty()
            ours.append(master)
            theirs.append(slave)
            spec.pty.apply(master)
            stdin_arg: int = slave
            stdout_arg: int = slave
            stderr_arg: int = slave
            stdin_fd = stdout_fd = stderr_fd = None
            pty_fd: int | None = master
        else:
            out_r, out_w = os.pipe()
            ours.append(out_r)
            theirs.append(out_w)
            err_r, err_w = os.pipe()
            ours.append(err_r)
            theirs.append(err_w)
            stdout_arg, stderr_arg = out_w, err_w
            stdout_fd, stderr_fd, pty_fd = out_r, err_r, None
            if spec.stdin:
                in_r, in_w = os.pipe()
                ours.append(in_w)
                theirs.append(in_r)
                stdin_arg, stdin_fd = in_r, in_w
            else:
                stdin_arg, stdin_fd = subprocess.DEVNULL, None
        for fd in ours:
            os.set_blocking(fd, False)
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=stdin_arg,
            stdout=stdout_arg,
            stderr=stderr_arg,
            cwd=spec.cwd,
            env=spec.env,
            start_new_session=True,
            preexec_fn=setup,
            close_fds=True,
        )
    except FileNotFoundError as err:
        _close_quietly(*ours)
        raise InvalidArgument(f"cannot execute {spec.argv[0]!r}: no such file") from err
    except PermissionError as err:
        _close_quietly(*ours)
        raise InvalidArgument(f"cannot execute {spec.argv[0]!r}: permission denied") from err
    except OSError as err:
        _close_quietly(*ours)
        if err.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
            raise ResourceExhausted(f"cannot start process: {err.strerror}") from err
        raise InvalidArgument(f"cannot execute {spec.argv[0]!r}: {err.strerror}") from err
    except subprocess.SubprocessError as err:
        _close_quietly(*ours)
        raise Internal("process setup between fork and exec failed") from err
    except BaseException:
        _close_quietly(*ours)
        raise
    finally:
        _close_quietly(*theirs)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as err:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        _close_quietly(*ours)
        raise ResourceExhausted(f"cannot watch the new process: {err.strerror}") from err
    return Spawned(popen, pidfd, stdin_fd, stdout_fd, stderr_fd, pty_fd)
