"""One sandbox of the base template, driven through the control plane's API and proxy by the
e2b SDK: commands (output, exit codes, environment, users, background processes, stdin),
files (text, binary, listing, moves, watches), a PTY, listing with a metadata filter, and
kill. The commands, files and PTY tests share one sandbox: none changes what another reads."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator

import pytest
from e2b import (
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    Sandbox,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)
from e2b.sandbox.commands.command_handle import PtySize

from tests.e2e.conftest import Sandboxes

pytestmark = [pytest.mark.vm, pytest.mark.slow]

HOME = "/home/user"


@pytest.fixture(scope="module")
def sbx(module_sandboxes: Sandboxes) -> Sandbox:
    return module_sandboxes.create(timeout=900, metadata={"role": "main"}, envs={"FROM": "create"})


def test_commands(sbx: Sandbox) -> None:
    done = sbx.commands.run("echo out; echo err >&2")
    assert (done.stdout, done.stderr, done.exit_code) == ("out\n", "err\n", 0)

    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo before; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "before\n"

    # Defaults: the template's user in its home; create's variables, the command's own.
    assert sbx.commands.run("id -un; pwd; echo $FROM").stdout == f"user\n{HOME}\ncreate\n"
    done = sbx.commands.run(
        "id -un; pwd; echo $FROM", user="root", cwd="/tmp", envs={"FROM": "run"}
    )
    assert done.stdout == "root\n/tmp\nrun\n"

    lines: list[str] = []
    sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=lines.append)
    assert "".join(lines) == "line1\nline2\nline3\n"


def test_background_processes_and_stdin(sbx: Sandbox) -> None:
    sleeper = sbx.commands.run("sleep 600", background=True)
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sleeper.pid not in [p.pid for p in sbx.commands.list()]

    reader = sbx.commands.run("read a; read b; echo got:$a:$b", background=True, stdin=True)
    sbx.commands.send_stdin(reader.pid, "one\n")
    sbx.commands.send_stdin(reader.pid, "two\n")
    assert reader.wait().stdout == "got:one:two\n"


def test_files(sbx: Sandbox) -> None:
    root = f"{HOME}/files"
    sbx.files.make_dir(root)
    sbx.files.write(f"{root}/hello.txt", "hello\n")
    assert sbx.files.read(f"{root}/hello.txt") == "hello\n"
    # Written by the API, read by a process: the same file in the guest, owned by the user.
    assert sbx.commands.run(f"cat {root}/hello.txt; stat -c %U {root}/hello.txt").stdout == (
        "hello\nuser\n"
    )

    blob = os.urandom(3 << 20)
    sbx.files.write(f"{root}/blob.bin", blob)
    assert sbx.files.read(f"{root}/blob.bin", format="bytes") == blob
    assert sbx.commands.run(f"stat -c %s {root}/blob.bin").stdout == f"{len(blob)}\n"
    # A binary file object goes with its length: envd splices it into the file, and the
    # connection it came on ends; the next calls find their way all the same.
    spliced = os.urandom(5 << 20)
    sbx.files.write(f"{root}/spliced.bin", io.BytesIO(spliced))
    assert sbx.files.read(f"{root}/spliced.bin", format="bytes") == spliced
    assert sbx.commands.run(f"stat -c %U {root}/spliced.bin").stdout == "user\n"

    # A long download: on its way through the agent and the proxy its bytes move socket to
    # socket in the kernel (docs/api.md, *Relaying*).
    sbx.commands.run(f"head -c {40 << 20} /dev/urandom > {HOME}/long.bin")
    digest = sbx.commands.run(f"sha256sum {HOME}/long.bin").stdout.split()[0]
    long = sbx.files.read(f"{HOME}/long.bin", format="bytes")
    assert (len(long), hashlib.sha256(long).hexdigest()) == (40 << 20, digest)
    sbx.files.remove(f"{HOME}/long.bin")

    assert sorted(e.name for e in sbx.files.list(root)) == ["blob.bin", "hello.txt", "spliced.bin"]
    sbx.files.rename(f"{root}/hello.txt", f"{root}/moved.txt")
    assert not sbx.files.exists(f"{root}/hello.txt")
    assert sbx.files.get_info(f"{root}/moved.txt").size == len("hello\n")
    sbx.files.remove(f"{root}/moved.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{root}/moved.txt")


def test_watch_dir(sbx: Sandbox) -> None:
    watched = f"{HOME}/watched"
    sbx.files.make_dir(watched)
    handle = sbx.files.watch_dir(watched)
    try:
        sbx.commands.run(f"echo x > {watched}/new.txt")
        seen: set[tuple[str, FilesystemEventType]] = set()
        for _ in range(50):
            seen |= {(e.name, e.type) for e in handle.get_new_events()}
            if ("new.txt", FilesystemEventType.CREATE) in seen:
                break
            time.sleep(0.2)
        assert ("new.txt", FilesystemEventType.CREATE) in seen
    finally:
        handle.stop()


class Terminal:
    """A PTY read as one byte stream; each command's output framed by markers the shell
    computes, so the echo of the typed line never matches them."""

    def __init__(self, sbx: Sandbox, rows: int, cols: int) -> None:
        self.sbx = sbx
        self.handle = sbx.pty.create(PtySize(rows=rows, cols=cols), timeout=120)
        self._events: Iterator[tuple[str | None, str | None, bytes | None]] = iter(self.handle)
        self._seen = b""

    def run(self, command: str, tag: str) -> str:
        line = f'echo "<{tag}-$((1))>"; {command}; echo "</{tag}-$((1))>"\n'
        self.sbx.pty.send_stdin(self.handle.pid, line.encode())
        while f"</{tag}-1>".encode() not in self._seen:
            _, _, data = next(self._events)
            self._seen += data or b""
        before, _, self._seen = self._seen.partition(f"</{tag}-1>".encode())
        return before.split(f"<{tag}-1>".encode(), 1)[1].decode().strip()


def test_pty(sbx: Sandbox) -> None:
    term = Terminal(sbx, rows=24, cols=80)
    try:
        assert term.run("stty size", "a") == "24 80"
        assert term.run("tty", "b").startswith("/dev/pts/")
        sbx.pty.resize(term.handle.pid, PtySize(rows=40, cols=120))
        assert term.run("stty size; id -un", "c").split() == ["40", "120", "user"]
        sbx.pty.send_stdin(term.handle.pid, b"exit 7\n")
        with pytest.raises(CommandExitException) as ended:
            term.handle.wait()
        assert ended.value.exit_code == 7
    finally:
        sbx.pty.kill(term.handle.pid)


def test_list_with_metadata_filter(sbx: Sandbox, sandboxes: Sandboxes, run_id: str) -> None:
    other = sandboxes.create(metadata={"role": "other"})

    def listed(**metadata: str) -> list[str]:
        found = Sandbox.list(query=SandboxQuery(metadata=metadata)).next_items()
        return sorted(s.sandbox_id for s in found)

    assert listed(e2e=run_id, role="main") == [sbx.sandbox_id]
    assert listed(e2e=run_id, role="other") == [other.sandbox_id]
    assert listed(e2e=run_id, role="nobody") == []
    both = listed(e2e=run_id)
    assert sbx.sandbox_id in both and other.sandbox_id in both

    info = other.get_info()
    assert info.metadata == {"e2e": run_id, "role": "other"}
    assert info.state == SandboxState.RUNNING
    assert info.template_id == "base"


def test_kill(sandboxes: Sandboxes, run_id: str) -> None:
    doomed = sandboxes.create(metadata={"role": "doomed"})
    assert doomed.is_running()
    assert doomed.kill() is True
    assert not doomed.is_running()
    assert Sandbox.kill(doomed.sandbox_id) is False  # gone already
    found = Sandbox.list(query=SandboxQuery(metadata={"e2e": run_id, "role": "doomed"}))
    assert found.next_items() == []
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(doomed.sandbox_id)
