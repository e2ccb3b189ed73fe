"""process.Process driven through the official e2b SDK (and, where the SDK has no call for
an option, through the generated Connect client) against a real envd process."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import signal
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import (
    AsyncSandbox,
    CommandExitException,
    CommandHandle,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    TimeoutException,
)
from protobuf import Oneof

from tests.conftest import EnvdProcess
from wrenn.gen.process.process_connect import ProcessClientSync
from wrenn.gen.process.process_pb import (
    ConnectRequest,
    ProcessConfig,
    ProcessEvent,
    ProcessSelector,
    SendSignalRequest,
    Signal,
    StartRequest,
    UpdateRequest,
)

MIB = 1 << 20


def eventually(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Wait for something that happens asynchronously (a safety net, not a speed check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def reaping(*pids: int) -> Iterator[None]:
    """Kill, by pid, processes a test caused to be left running."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def first_line(handle: CommandHandle) -> str:
    """Read a background command's output up to its first newline."""
    out = ""
    for stdout, _, _ in handle:
        out += stdout or ""
        if "\n" in out:
            return out.split("\n", 1)[0]
    raise AssertionError(f"command ended before printing a line: {out!r}")


@pytest.fixture
def rpc(envd: EnvdProcess) -> Iterator[ProcessClientSync]:
    with ProcessClientSync(envd.url) as client:
        yield client


def start_request(cmd: str, *args: str, tag: str | None = None) -> StartRequest:
    return StartRequest(process=ProcessConfig(cmd=cmd, args=list(args)), tag=tag, stdin=False)


# --- run, exit codes, identity -----------------------------------------------------------


def test_run_collects_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
    assert result.error is None


def test_non_zero_exit_raises_command_exit_exception(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; echo broken >&2; exit 7")
    assert info.value.exit_code == 7
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "broken\n"
    assert info.value.error == "exit status 7"


def test_env_vars_reach_the_process(sandbox: Sandbox) -> None:
    result = sandbox.commands.run(
        'printf "%s|%s" "$WRENN_A" "$WRENN_B"', envs={"WRENN_A": "one", "WRENN_B": "two words"}
    )
    assert result.stdout == "one|two words"


def test_cwd(sandbox: Sandbox) -> None:
    with tempfile.TemporaryDirectory() as directory:
        result = sandbox.commands.run("pwd", cwd=directory)
        assert result.stdout.strip() == os.path.realpath(directory)


def test_missing_cwd_is_invalid_argument(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sandbox.commands.run("true", cwd="/no/such/directory")


def test_runs_as_the_requested_user(sandbox: Sandbox) -> None:
    nobody = pwd.getpwnam("nobody")
    groups = sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    result = sandbox.commands.run(
        'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME|$SHELL"', user="nobody"
    )
    uid, gid, all_groups, identity = result.stdout.splitlines()
    assert int(uid) == nobody.pw_uid
    assert int(gid) == nobody.pw_gid
    assert sorted(int(g) for g in all_groups.split()) == groups
    assert identity == f"{nobody.pw_dir}|nobody|nobody|{nobody.pw_shell}"
    assert grp.getgrgid(nobody.pw_gid)  # the group exists on this machine


def test_root_is_the_default_user(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("id -u").stdout.strip() == "0"


def test_unknown_user_is_invalid_argument(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException, match="no-such-user"):
        sandbox.commands.run("true", user="no-such-user")  # type: ignore[arg-type]


# --- background, list, kill, stdin -------------------------------------------------------


def test_background_list_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300", background=True)
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].cmd == "/bin/bash"
    assert listed[handle.pid].args == ["-l", "-c", "sleep 300"]
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    assert handle.pid not in {p.pid for p in sandbox.commands.list()}
    assert sandbox.commands.kill(handle.pid) is False


def test_stdin_send_and_close(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat; echo done", background=True, stdin=True)
    handle.send_stdin("hello ")
    sandbox.commands.send_stdin(handle.pid, b"world\n")
    handle.close_stdin()
    assert handle.wait().stdout == "hello world\ndone\n"


def test_stdin_is_empty_unless_enabled(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("cat; echo eof").stdout == "eof\n"


def test_stream_input(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["a", b"b", "c\n"])
    handle.close_stdin()
    assert handle.wait().stdout == "abc\n"


def test_send_stdin_after_close_fails(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300", background=True, stdin=True)
    try:
        handle.close_stdin()
        with pytest.raises(Exception, match="closed"):
            handle.send_stdin("late")
    finally:
        handle.kill()


# --- connect ------------------------------------------------------------------------------


def test_connect_by_pid_receives_output_from_then_on(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run(
        'echo before; read line; echo "got $line"', background=True, stdin=True
    )
    assert first_line(handle) == "before"
    attached = sandbox.commands.connect(handle.pid)
    handle.send_stdin("ping\n")
    assert attached.wait().stdout == "got ping\n"
    assert handle.wait().stdout == "before\ngot ping\n"


def test_connect_after_exit_reports_the_end(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("exit 5", background=True)
    with pytest.raises(CommandExitException):
        handle.wait()
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.connect(handle.pid).wait()
    assert info.value.exit_code == 5


def test_connect_by_tag(rpc: ProcessClientSync) -> None:
    started = iter(rpc.start(start_request("sleep", "300", tag="t-conn")))
    selector = ProcessSelector(selector=Oneof("tag", "t-conn"))
    try:
        first = next(started).event
        assert first is not None
        match first.event:
            case Oneof(field="start", value=ProcessEvent.StartEvent() as start):
                pid = start.pid
            case other:
                pytest.fail(f"expected a start event, got {other}")
        attached = iter(rpc.connect(ConnectRequest(process=selector)))
        event = next(attached).event
        assert event is not None
        assert event.event == Oneof("start", ProcessEvent.StartEvent(pid=pid))
        with pytest.raises(ConnectError) as info:
            list(rpc.start(start_request("true", tag="t-conn")))
        assert info.value.code == Code.ALREADY_EXISTS
    finally:
        rpc.send_signal(SendSignalRequest(process=selector, signal=Signal.SIGKILL))
    ends = [r.event.event for r in attached if r.event is not None and r.event.event is not None]
    assert ends[-1].field == "end"
    ends = [r.event.event for r in started if r.event is not None and r.event.event is not None]
    assert ends[-1].field == "end"


def test_unknown_pid_and_tag_are_not_found(sandbox: Sandbox, rpc: ProcessClientSync) -> None:
    with pytest.raises(NotFoundException, match="999999"):
        sandbox.commands.connect(999999)
    with pytest.raises(NotFoundException, match="999999"):
        sandbox.commands.send_stdin(999999, "x")
    assert sandbox.commands.kill(999999) is False
    selector = ProcessSelector(selector=Oneof("tag", "no-such-tag"))
    with pytest.raises(ConnectError) as info:
        rpc.send_signal(SendSignalRequest(process=selector, signal=Signal.SIGTERM))
    assert info.value.code == Code.NOT_FOUND
    assert "no-such-tag" in info.value.message


def test_invalid_requests_are_rejected_and_envd_survives(
    sandbox: Sandbox, rpc: ProcessClientSync
) -> None:
    def code_of(call: Callable[[], object]) -> Code:
        with pytest.raises(ConnectError) as info:
            call()
        return info.value.code

    assert code_of(lambda: list(rpc.start(StartRequest()))) == Code.INVALID_ARGUMENT
    assert code_of(lambda: list(rpc.start(start_request("")))) == Code.INVALID_ARGUMENT
    assert code_of(lambda: list(rpc.start(start_request("/no/such/binary")))) == (
        Code.INVALID_ARGUMENT
    )
    assert code_of(lambda: rpc.update(UpdateRequest())) == Code.INVALID_ARGUMENT
    handle = sandbox.commands.run("sleep 300", background=True)
    try:
        selector = ProcessSelector(selector=Oneof("pid", handle.pid))
        unsupported = SendSignalRequest(process=selector, signal=Signal.UNSPECIFIED)
        assert code_of(lambda: rpc.send_signal(unsupported)) == Code.INVALID_ARGUMENT
        no_pty = UpdateRequest(process=selector)
        assert code_of(lambda: rpc.update(no_pty)) == Code.INVALID_ARGUMENT
    finally:
        handle.kill()
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


# --- output volume, process groups, ending -----------------------------------------------


def test_fifty_mib_of_output_arrives_whole(sandbox: Sandbox) -> None:
    size = 50 * MIB
    digest = hashlib.sha256()
    received = 0

    def consume(chunk: str) -> None:
        nonlocal received
        data = chunk.encode()
        digest.update(data)
        received += len(data)

    # Printable, position-dependent content: the decimal numbers, one per line.
    count = 8_000_000
    sandbox.commands.run(
        f"seq 1 {count} | head -c {size}", on_stdout=consume, retain_output=False, timeout=240
    )
    expected = hashlib.sha256()
    remaining = size
    for start in range(1, count + 1, 100_000):
        block = b"".join(b"%d\n" % n for n in range(start, start + 100_000))[:remaining]
        expected.update(block)
        remaining -= len(block)
        if not remaining:
            break
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()


def test_slow_subscriber_does_not_hold_up_a_fast_one(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run(
        f"read go; head -c {20 * MIB} /dev/zero | tr '\\0' x", background=True, stdin=True
    )
    idle = sandbox.commands.connect(handle.pid)  # attached, never read
    try:
        handle.send_stdin("go\n")
        result = handle.wait()
        assert len(result.stdout) == 20 * MIB
    finally:
        idle.disconnect()


def test_background_children_do_not_hang_the_end(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("sleep 300 & echo $!; echo done")
    child, done = result.stdout.splitlines()
    with reaping(int(child)):
        assert done == "done"
        assert not gone(int(child))


def test_kill_reaches_the_process_group(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300 & echo $!; wait", background=True)
    child = int(first_line(handle))
    with reaping(child):
        assert handle.kill()
        with pytest.raises(CommandExitException):
            handle.wait()
        eventually(lambda: gone(child), f"background child {child} killed with its group")


def test_sigterm_reaches_the_process_group(sandbox: Sandbox, rpc: ProcessClientSync) -> None:
    handle = sandbox.commands.run("sleep 300 & echo $!; wait", background=True)
    child = int(first_line(handle))
    with reaping(child):
        selector = ProcessSelector(selector=Oneof("pid", handle.pid))
        rpc.send_signal(SendSignalRequest(process=selector, signal=Signal.SIGTERM))
        with pytest.raises(CommandExitException) as info:
            handle.wait()
        assert info.value.exit_code == -1
        assert info.value.error == "signal: terminated"
        eventually(lambda: gone(child), f"background child {child} terminated with its group")


def test_each_process_leads_its_own_session(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("ps -o pid=,pgid=,sid= -p $$")
    pid, pgid, sid = result.stdout.split()
    assert pid == pgid == sid


def test_request_timeout_kills_the_process(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300", background=True, timeout=2)
    with pytest.raises(TimeoutException):
        handle.wait()
    eventually(
        lambda: handle.pid not in {p.pid for p in sandbox.commands.list()},
        "process killed when its start request's timeout elapsed",
    )


def test_keepalives_while_output_is_idle(rpc: ProcessClientSync) -> None:
    events = rpc.start(start_request("sleep", "3"), headers={"Keepalive-Ping-Interval": "1"})
    kinds = [r.event.event.field for r in events if r.event is not None and r.event.event]
    assert kinds[0] == "start"
    assert "keepalive" in kinds
    assert kinds[-1] == "end"


# --- async SDK ----------------------------------------------------------------------------


async def test_async_run_and_connect(envd: EnvdProcess) -> None:
    sandbox = await AsyncSandbox.create(debug=True, sandbox_url=envd.url)
    result = await sandbox.commands.run("echo async")
    assert result.stdout == "async\n"

    seen: list[str] = []
    handle = await sandbox.commands.run('read x; echo "$x"; exit 3', background=True, stdin=True)
    attached = await sandbox.commands.connect(handle.pid, on_stdout=seen.append)
    await sandbox.commands.send_stdin(handle.pid, "via async\n")
    with pytest.raises(CommandExitException) as info:
        await attached.wait()
    assert info.value.exit_code == 3
    assert "".join(seen) == "via async\n"
    with pytest.raises(CommandExitException):
        await handle.wait()


async def test_async_kill(envd: EnvdProcess) -> None:
    sandbox = await AsyncSandbox.create(debug=True, sandbox_url=envd.url)
    handle = await sandbox.commands.run("sleep 300", background=True)
    assert await handle.kill()
    with pytest.raises(CommandExitException):
        await handle.wait()
    assert await sandbox.commands.kill(handle.pid) is False
