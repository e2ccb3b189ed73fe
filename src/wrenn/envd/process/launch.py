"""What to start: a validated start request resolved into argv, environment, working
directory, identity, terminal and stdin."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import Mapping
from dataclasses import dataclass

from wrenn.core.errors import InvalidArgument, PermissionDenied
from wrenn.envd.defaults import Defaults
from wrenn.envd.users import User

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm-256color"


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
    """Everything needed to start one user process."""

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
