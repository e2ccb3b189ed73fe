"""An interactive terminal into a sandbox: a PTY started through the SDK, the local terminal
in raw mode while it runs (so keys such as Ctrl-C reach the sandbox), resized on SIGWINCH,
and restored on the way out however the session ends. When the local side goes away
(SIGHUP, SIGTERM, a terminal that cannot be read) the sandbox's shell is killed: processes
in a sandbox outlive their client otherwise."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from wrenn.core.errors import FailedPrecondition

if TYPE_CHECKING:
    from e2b import CommandHandle, Sandbox

# Bytes on the wake-up pipe: the number of a signal that arrived (written by the
# interpreter's C-level handler, whichever thread the signal hit), or _ENDED from the output
# thread.
_RESIZED = bytes([signal.SIGWINCH])
_HUNG_UP = bytes([signal.SIGHUP])
_TERMINATED = bytes([signal.SIGTERM])
_ENDED = b"\x00"
_WATCHED = (signal.SIGWINCH, signal.SIGHUP, signal.SIGTERM)
_READ_BYTES = 64 * 1024


@dataclass
class _Outcome:
    exit_code: int | None = None
    error: BaseException | None = None
    ended: threading.Event = field(default_factory=threading.Event)


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; 24x80 when it reports none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return (size.lines or 24), (size.columns or 80)


def require_terminal() -> None:
    """Refuse to start a shell without a terminal on stdin."""
    try:
        tty_in = os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):  # replaced or closed stdin
        tty_in = False
    if not tty_in:
        raise FailedPrecondition(
            "`shell` needs a terminal on stdin; run a single command with `wrenn sandbox exec`"
        )


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """``fd``'s terminal in raw mode for the block; its settings put back afterwards."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error):  # a terminal that hung up cannot be reset
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signals_to(wake_fd: int) -> Iterator[None]:
    """SIGWINCH, SIGHUP and SIGTERM arrive as their numbers on ``wake_fd`` (non-blocking)."""

    def noted(signum: int, frame: FrameType | None) -> None:
        """The wake-up fd already has it."""

    previous = {s: signal.signal(s, noted) for s in _WATCHED}
    # Written by the C-level handler at once: a signal delivered to the output thread still
    # wakes the input loop's select() before any input typed after it is read.
    previous_fd = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)


def _pump_output(handle: CommandHandle, out_fd: int, outcome: _Outcome, wake_fd: int) -> None:
    """Copy the PTY's output to ``out_fd`` until the shell ends (runs on its own thread)."""
    import e2b

    def write(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(out_fd, view) :]

    try:
        result = handle.wait(on_pty=write)
        outcome.exit_code = result.exit_code
    except e2b.CommandExitException as err:
        outcome.exit_code = err.exit_code
    except BaseException as err:
        outcome.error = err
    finally:
        outcome.ended.set()
        with contextlib.suppress(OSError):
            os.write(wake_fd, _ENDED)


def run_shell(
    sandbox: Sandbox,
    *,
    user: str | None,
    cwd: str | None,
    in_fd: int | None = None,
    out_fd: int | None = None,
) -> int:
    """Run a login shell in ``sandbox`` on this terminal; its exit code."""
    from e2b.sandbox.commands.command_handle import PtySize

    require_terminal()
    in_fd = sys.stdin.fileno() if in_fd is None else in_fd
    out_fd = sys.stdout.fileno() if out_fd is None else out_fd
    size_fd = out_fd if os.isatty(out_fd) else in_fd
    rows, cols = terminal_size(size_fd)
    envs = {"TERM": os.environ.get("TERM") or "xterm-256color"}
    handle = sandbox.pty.create(
        PtySize(rows=rows, cols=cols), user=user, cwd=cwd, envs=envs, timeout=0
    )
    outcome = _Outcome()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pump = threading.Thread(
        target=_pump_output,
        args=(handle, out_fd, outcome, wake_w),
        name="pty-output",
        daemon=True,
    )
    try:
        with raw_terminal(in_fd), _signals_to(wake_w):
            pump.start()
            stopped_by = _forward_input(sandbox, handle.pid, in_fd, size_fd, wake_r, outcome.ended)
    finally:
        if pump.is_alive():
            # The shell is still running (local input ended or failed): end it.
            with contextlib.suppress(Exception):
                sandbox.pty.kill(handle.pid)
            pump.join(10)
        if not pump.is_alive():  # else it may still write to wake_w: leave both open
            os.close(wake_r)
            os.close(wake_w)
    if stopped_by is not None:
        return 128 + stopped_by
    if outcome.error is not None:
        raise outcome.error
    return outcome.exit_code if outcome.exit_code is not None else 1


def _forward_input(
    sandbox: Sandbox, pid: int, in_fd: int, size_fd: int, wake_r: int, ended: threading.Event
) -> int | None:
    """Send stdin to the PTY and resize it on SIGWINCH until the shell ends (``None``) or the
    local terminal goes away (the signal that said so; SIGHUP for a read error).

    The size is also compared before every input is sent: SIGWINCH may reach this process
    after keys typed once the terminal was resized, and those keys must find the sandbox's
    terminal at its new size."""
    from e2b.sandbox.commands.command_handle import PtySize

    size = terminal_size(size_fd)

    def sync_size() -> None:
        nonlocal size
        current = terminal_size(size_fd)
        if current != size:
            size = current
            sandbox.pty.resize(pid, PtySize(rows=current[0], cols=current[1]))

    while True:
        try:
            ready, _, _ = select.select([in_fd, wake_r], [], [])
        except InterruptedError:
            continue
        try:
            if wake_r in ready:
                signals = os.read(wake_r, 64)
                if _ENDED in signals:
                    return None
                if _HUNG_UP in signals:
                    return signal.SIGHUP
                if _TERMINATED in signals:
                    return signal.SIGTERM
                if _RESIZED in signals:
                    sync_size()
            if in_fd in ready:
                try:
                    data = os.read(in_fd, _READ_BYTES)
                except OSError:  # EIO: the terminal hung up
                    data = b""
                if not data:
                    return signal.SIGHUP
                sync_size()
                sandbox.pty.send_stdin(pid, data)
        except Exception:
            if ended.is_set():
                return None  # the shell exited while its last input or resize was in flight
            raise
