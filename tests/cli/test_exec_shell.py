"""``wrenn sandbox exec`` and ``shell`` through the e2b SDK against a real envd process.

Sandboxes live on a FakeHostAgent TEST DOUBLE whose forwarding-path double leads their envd
traffic to one real envd (given each sandbox's access token by /init as it starts). By default
the CLI sends that traffic to the control plane's API port, whose sandbox proxy forwards it to
the host; ``--sandbox-url`` (the debugging route) sends it straight to the envd. The fake agent
reports envd 0.3.0, for which the SDK asks for user ``user``; the tests name ``root`` (envd
runs as root here)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from tests.conftest import EnvdProcess


@pytest.fixture
def sandbox_id(cli: Cli) -> Iterator[str]:
    made = cli("sandbox", "create")
    assert made.exit_code == 0, made.output
    yield made.stdout.strip()
    cli("sandbox", "kill", made.stdout.strip())


def test_exec_streams_output_and_exit_code(cli: Cli, sandbox_id: str) -> None:
    base = ("sandbox", "exec")
    ok = cli(*base, "--user", "root", sandbox_id, "--", "echo", "hello world", "$HOME")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == "hello world $HOME\n"  # several arguments are quoted, not expanded

    line = cli(*base, "-u", "root", "-e", "WHO=cli", sandbox_id, "echo $WHO; echo oops >&2")
    assert line.exit_code == 0, line.output
    assert line.stdout == "cli\n"
    assert line.stderr == "oops\n"

    in_dir = cli(*base, "-u", "root", "--cwd", "/tmp", sandbox_id, "pwd")
    assert in_dir.stdout == "/tmp\n"

    failed = cli(*base, "-u", "root", sandbox_id, "--", "sh", "-c", "echo partial; exit 7")
    assert failed.exit_code == 7
    assert failed.stdout == "partial\n"


def test_exec_straight_to_an_envd(cli: Cli, sandbox_envd: EnvdProcess, sandbox_id: str) -> None:
    direct = cli(
        "--sandbox-url", sandbox_envd.url, "sandbox", "exec", "-u", "root", sandbox_id, "id -u"
    )
    assert direct.exit_code == 0, direct.output
    assert direct.stdout == "0\n"


def test_exec_errors(cli: Cli, sandbox_id: str) -> None:
    unknown = cli("sandbox", "exec", "nosuchsandbox", "--", "true")
    assert unknown.exit_code == 1
    assert "not found" in unknown.stderr
    no_command = cli("sandbox", "exec", sandbox_id)
    assert no_command.exit_code in (1, 2)
    assert "Traceback" not in no_command.output
    # A shell needs a terminal.
    no_tty = cli("sandbox", "shell", sandbox_id)
    assert no_tty.exit_code == 1
    assert "needs a terminal" in no_tty.stderr
    killed = cli("sandbox", "kill", sandbox_id)
    assert killed.exit_code == 0
    gone = cli("sandbox", "exec", "-u", "root", sandbox_id, "true")
    assert gone.exit_code == 1
    assert "not found" in gone.stderr
    assert "Traceback" not in gone.output


class Terminal:
    """``wrenn sandbox shell`` in a child process whose controlling terminal is a real
    pseudo-terminal; the test types into the master side and reads what the CLI prints."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.before = termios.tcgetattr(self.slave)
        self.seen = b""
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=env,
            start_new_session=True,
            preexec_fn=_take_controlling_terminal,
        )

    def resize(self, rows: int, cols: int) -> None:
        # On the slave: the kernel sends SIGWINCH to the terminal's foreground process group.
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def read_until(self, marker: bytes, timeout_s: float = 60.0) -> bytes:
        """Output up to and including ``marker`` (a bound on waiting, not a speed check)."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"never saw {marker!r}; got {self.seen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {marker!r}: {self.seen!r}")
                self.seen += chunk
        before, _, self.seen = self.seen.partition(marker)
        return before + marker

    def run(self, command: str, tag: str) -> str:
        """``command``'s output between markers the remote shell computes (so the echo of the
        typed line never matches them)."""
        self.type(f'echo "<{tag}$((1))>"; {command}; echo "</{tag}$((1))>"\r')
        self.read_until(f"<{tag}1>".encode())
        out = self.read_until(f"</{tag}1>".encode())
        return out.decode(errors="replace").rsplit(f"</{tag}1>", 1)[0].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def _take_controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextlib.contextmanager
def terminal(cli: Cli, sandbox_id: str, sandbox_url: str | None = None) -> Iterator[Terminal]:
    argv = [sys.executable, "-m", "wrenn.cli", "sandbox", "shell", "--user", "root", sandbox_id]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "xterm",
        "WRENN_API_URL": cli.api_url,
        "WRENN_API_KEY": cli.api_key or "",
        "WRENN_CONFIG": str(cli.config),
        **({"WRENN_SANDBOX_URL": sandbox_url} if sandbox_url else {}),
    }
    term = Terminal(argv, env, rows=24, cols=80)
    try:
        yield term
    finally:
        term.close()


@pytest.mark.parametrize("route", ["proxy", "direct"])
def test_shell_is_an_interactive_terminal(
    cli: Cli, sandbox_envd: EnvdProcess, sandbox_id: str, route: str
) -> None:
    with terminal(cli, sandbox_id, sandbox_envd.url if route == "direct" else None) as term:
        term.type('echo "<$((6*7))>"\r')
        term.read_until(b"<42>")
        assert term.run("tty >/dev/null && echo yes", "t") == "yes"
        assert term.run("stty size", "a") == "24 80"

        # A resize of the local terminal reaches the sandbox's PTY (SIGWINCH).
        term.resize(40, 120)
        assert term.run("stty size", "b") == "40 120"

        # Raw mode: Ctrl-C is a byte for the sandbox, not a signal for the CLI.
        term.type('echo "<s$((1))>"; sleep 300\r')
        term.read_until(b"<s1>")  # the shell is running the line, not reading one
        term.type("\x03")
        term.read_until(b"^C")  # the sandbox's terminal echoes the interrupt
        term.read_until(b"# ")  # and the shell prompts again
        assert term.run("echo still here", "c") == "still here"
        assert term.proc.poll() is None

        term.type("exit 3\r")
        assert term.proc.wait(60) == 3
        # The local terminal is as it was before the session.
        assert termios.tcgetattr(term.slave) == term.before


def test_shell_ends_when_its_terminal_hangs_up(
    cli: Cli, sandbox_envd: EnvdProcess, sandbox_id: str, tmp_path: Path
) -> None:
    with terminal(cli, sandbox_id) as term:
        term.type(f"echo $$ > {tmp_path}/pid; echo ready-$((1))\r")
        term.read_until(b"ready-1")
        remote_pid = int((tmp_path / "pid").read_text())
        term.proc.send_signal(signal.SIGHUP)  # what a closed terminal window sends
        assert term.proc.wait(60) == 128 + signal.SIGHUP
        # The sandbox's shell did not outlive the session.
        deadline = time.monotonic() + 30
        while Path(f"/proc/{remote_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{remote_pid}").exists()
