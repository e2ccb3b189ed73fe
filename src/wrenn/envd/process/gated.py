"""Starting a process without forking envd: ``posix_spawn`` from a thread acting as the user
(``credentials``), held at the spawn gate until it is in the user cgroup with its OOM score
(``gate``). The child runs, in order: ``setsid``, the gate, its streams (a terminal opened anew
becomes the controlling terminal), closing every other descriptor, exec; with every signal at
its default disposition and none blocked. It starts in the spawning thread's working directory,
which the caller set (as root, so a directory the user cannot reach works as with ``Popen``'s
``cwd``).

Everything here runs on the spawning thread while it acts as the user, so the ``PATH`` lookup
below and the exec see the same permissions.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from wrenn.envd.process import posix_spawn
from wrenn.envd.process.gate import SpawnGate
from wrenn.envd.process.launch import LaunchSpec
from wrenn.envd.process.streams import Streams


class GateDenied(Exception):
    """The gate refused the child (it could not be placed in the user cgroup)."""


def executable(cmd: str, env: Mapping[str, str], cwd: str) -> str:
    """The file ``cmd`` names, looked up in ``env``'s ``PATH`` like ``execvpe`` (and Popen)
    do: a name with a slash as is, else the first executable regular file on the path. Raises
    ``PermissionError`` when some candidate was there but could not be run (or reached), else
    ``FileNotFoundError``."""
    if "/" in cmd:
        return cmd
    denied = False
    for directory in os.get_exec_path(dict(env)):
        candidate = os.path.join(cwd, directory or ".", cmd)
        try:
            found = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            denied = True
            continue
        if stat.S_ISREG(found.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), cmd)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd)


def spawn_gated(spec: LaunchSpec, streams: Streams, gate: SpawnGate) -> int:
    """Start ``spec`` and return its pid (blocking until it has exec'd)."""
    path = executable(spec.argv[0], spec.env, spec.cwd)
    actions = posix_spawn.FileActions()
    try:
        actions.open(0, gate.path, os.O_RDONLY)
        streams.add_to(actions)
        actions.close_from(3)
        denied = gate.denied
        try:
            return posix_spawn.spawn(path, spec.argv, spec.env, actions, setsid=True)
        except PermissionError:
            # EPERM while the gate refused someone: taken as this child's refusal (a
            # concurrent start's refusal could be counted here too; both are internal errors).
            if gate.denied != denied:
                raise GateDenied from None
            raise
    finally:
        actions.destroy()


class GatedChild:
    """A child started by :func:`spawn_gated`, reaped like ``subprocess.Popen`` reaps
    (``returncode`` negative for a signal)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reaped(self, flags: int) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: the status is lost
            self.returncode = 0
            return 0
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reaped(os.WNOHANG)

    def wait(self) -> int:
        code = self._reaped(0)
        assert code is not None
        return code
