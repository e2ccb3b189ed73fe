"""PTY sessions through the e2b SDK against a real envd: a real pseudo-terminal with bash as
its controlling-terminal session leader."""

from __future__ import annotations

import contextlib
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from e2b import CommandExitException, CommandHandle, InvalidArgumentException, Sandbox
from e2b.sandbox.commands.command_handle import PtySize


class Terminal:
    """A PTY started through the SDK, read as one byte stream."""

    def __init__(self, sandbox: Sandbox, handle: CommandHandle) -> None:
        self.sandbox = sandbox
        self.handle = handle
        self.pid: int = handle.pid
        self._events = iter(handle)
        self.seen = b""

    def type(self, line: str) -> None:
        self.sandbox.pty.send_stdin(self.pid, line.encode() + b"\n")

    def read_until(self, marker: bytes) -> bytes:
        """Output up to and including ``marker`` (the SDK's stream timeout bounds the wait)."""
        while marker not in self.seen:
            _, _, pty = next(self._events)
            self.seen += pty or b""
        before, _, after = self.seen.partition(marker)
        self.seen = after
        return before + marker

    def run(self, command: str, tag: str) -> str:
        """Run ``command`` and return its output, framed by markers the shell computes (so
        the terminal's echo of the typed line never matches them)."""
        self.type(f'echo "<{tag}-$((1))>"; {command}; echo "</{tag}-$((1))>"')
        self.read_until(f"<{tag}-1>".encode())
        out = self.read_until(f"</{tag}-1>".encode())
        return out.decode(errors="replace").rsplit(f"</{tag}-1>", 1)[0].strip()


def wait_for_foreground(shell_pid: int, name: str, timeout_s: float = 10.0) -> None:
    """Until a child of ``shell_pid`` called ``name`` leads the terminal's foreground process
    group (envd runs on this host in these tests: /proc shows its processes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(shell_pid).children():
            with contextlib.suppress(psutil.NoSuchProcess, OSError):
                stat = Path(f"/proc/{child.pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                pgrp, tpgid = int(fields[2]), int(fields[5])
                if child.name() == name and pgrp == tpgid:
                    return
        time.sleep(0.01)
    raise AssertionError(f"{name} never became the terminal's foreground job")


@contextlib.contextmanager
def terminal(
    sandbox: Sandbox, rows: int = 24, cols: int = 80, user: str | None = None
) -> Iterator[Terminal]:
    handle = sandbox.pty.create(PtySize(rows=rows, cols=cols), user=user, timeout=60)  # type: ignore[arg-type]
    term = Terminal(sandbox, handle)
    try:
        yield term
    finally:
        sandbox.pty.kill(term.pid)


def test_pty_size_term_and_resize(sandbox: Sandbox) -> None:
    with terminal(sandbox, rows=24, cols=80) as term:
        assert term.run("stty size", "a") == "24 80"
        assert term.run("echo $TERM", "b") == "xterm-256color"
        sandbox.pty.resize(term.pid, PtySize(rows=50, cols=132))
        assert term.run("stty size", "c") == "50 132"
        assert term.run("tput cols", "d") == "132"


def test_pty_is_the_controlling_terminal(sandbox: Sandbox) -> None:
    with terminal(sandbox) as term:
        assert term.run("tty", "a").startswith("/dev/pts/")
        # Ctrl-C reaches the foreground job through the terminal, not the shell.
        term.type("sleep 300")
        term.read_until(b"sleep 300")
        # Until bash has made sleep's group the terminal's foreground group, a Ctrl-C would
        # reach bash itself (which ignores it) and sleep would run on.
        wait_for_foreground(term.pid, "sleep")
        sandbox.pty.send_stdin(term.pid, b"\x03")
        assert term.run("echo survived", "b") == "survived"


def test_pty_as_another_user(sandbox: Sandbox) -> None:
    nobody = pwd.getpwnam("nobody")
    with terminal(sandbox, user="nobody") as term:
        assert term.run("id -u", "a") == str(nobody.pw_uid)


def test_pty_listed_and_connectable(sandbox: Sandbox) -> None:
    with terminal(sandbox) as term:
        assert term.pid in {p.pid for p in sandbox.commands.list()}
        attached = sandbox.pty.connect(term.pid, timeout=60)
        term.type('echo "joined-$((2+3))"')
        seen = b""
        for _, _, pty in attached:
            seen += pty or b""
            if b"joined-5" in seen:
                break
        attached.disconnect()


def test_pty_kill(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    assert sandbox.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert sandbox.pty.kill(handle.pid) is False


def test_exit_ends_the_session(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    sandbox.pty.send_stdin(handle.pid, b"exit 4\n")
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == 4


def test_pty_only_operations_on_a_plain_command(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300", background=True, stdin=True)
    try:
        with pytest.raises(InvalidArgumentException, match="pty"):
            sandbox.pty.resize(handle.pid, PtySize(rows=10, cols=10))
        with pytest.raises(InvalidArgumentException, match="pty"):
            sandbox.pty.send_stdin(handle.pid, b"x")
    finally:
        handle.kill()


def test_stdin_operations_on_a_pty(sandbox: Sandbox) -> None:
    with terminal(sandbox) as term:
        with pytest.raises(InvalidArgumentException, match="pty"):
            sandbox.commands.send_stdin(term.pid, "x")
        with pytest.raises(InvalidArgumentException, match="Ctrl-D"):
            sandbox.commands.close_stdin(term.pid)
