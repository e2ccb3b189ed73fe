"""How a started process begins its life, the same whichever way envd starts it: through the
spawn gate (``posix_spawn``, no fork of envd) or by forking (the fallback,
``WRENN_ENVD_FAST_SPAWN=false``). Each check looks at the started program itself (run directly,
no shell in between) through its own /proc entries."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from tests.conftest import EnvdProcess
from tests.envd.test_cgroups import layout_of
from wrenn.core.errors import Internal
from wrenn.envd.defaults import Defaults
from wrenn.envd.process.gate import SpawnGate
from wrenn.envd.process.launch import LaunchSpec, environment
from wrenn.envd.process.spawn import Spawner
from wrenn.envd.users import lookup
from wrenn.gen.process.process_connect import ProcessClientSync
from wrenn.gen.process.process_pb import PTY, ProcessConfig, StartRequest

NOBODY = "nobody"


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting processes as other users needs root")


def gate_available() -> bool:
    try:
        SpawnGate.open(lambda pid: None).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module", params=["gated", "forked"])
def spawning_envd(request: pytest.FixtureRequest) -> Iterator[EnvdProcess]:
    """An envd per way of starting processes; the log says which one it uses."""
    if request.param == "gated" and not gate_available():
        pytest.skip("no spawn gate here (needs root and fanotify permission events)")
    env = {"WRENN_ENVD_FAST_SPAWN": "true" if request.param == "gated" else "false"}
    proc = EnvdProcess(env=env)
    try:
        run(proc, "true")
        assert f'"mode": "{request.param}"' in proc.logs()
        yield proc
    finally:
        proc.stop()
        proc.log.unlink(missing_ok=True)


def run(envd: EnvdProcess, cmd: str, *args: str, user: str = NOBODY, cwd: str = "/") -> str:
    """stdout of ``cmd`` started directly as ``user`` (with a PATH every user may search);
    the stream must end with exit 0."""
    config = ProcessConfig(cmd=cmd, args=list(args), cwd=cwd, envs={"PATH": "/usr/bin:/bin"})
    request = StartRequest(process=config, stdin=False)
    out = b""
    code = None
    with ProcessClientSync(envd.url) as client:
        for response in client.start(request, headers=basic_auth(user)):
            event = response.event.event if response.event is not None else None
            if event is None:
                continue
            if event.field == "data" and event.value.output is not None:
                if event.value.output.field == "stdout":
                    out += event.value.output.value
            elif event.field == "end":
                code = event.value.exit_code
    assert code == 0, out
    return out.decode()


def run_on_pty(envd: EnvdProcess, cmd: str, *args: str, user: str = NOBODY) -> str:
    """What ``cmd`` printed on a new terminal of its own (CRLF line ends, as terminals do)."""
    config = ProcessConfig(cmd=cmd, args=list(args), envs={"PATH": "/usr/bin:/bin"})
    request = StartRequest(process=config, pty=PTY(size=PTY.Size(cols=80, rows=24)))
    out = b""
    with ProcessClientSync(envd.url) as client:
        for response in client.start(request, headers=basic_auth(user)):
            event = response.event.event if response.event is not None else None
            if event is not None and event.field == "data" and event.value.output is not None:
                out += event.value.output.value
    return out.decode().replace("\r\n", "\n")


def basic_auth(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_identity_is_the_users_everywhere(spawning_envd: EnvdProcess) -> None:
    nobody = pwd.getpwnam(NOBODY)
    groups = sorted(set(os.getgrouplist(NOBODY, nobody.pw_gid)))
    status = status_fields(run(spawning_envd, "cat", "/proc/self/status"))
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4  # real, effective, saved, fs
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert sorted(int(g) for g in status["Groups"].split()) == groups
    assert int(status["CapPrm"], 16) == 0
    assert int(status["CapEff"], 16) == 0


def test_root_after_another_user_is_root_again(spawning_envd: EnvdProcess) -> None:
    run(spawning_envd, "true")
    status = status_fields(run(spawning_envd, "cat", "/proc/self/status", user="root"))
    assert status["Uid"].split() == ["0"] * 4
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16)


def test_no_signal_blocked_or_ignored(spawning_envd: EnvdProcess) -> None:
    status = status_fields(run(spawning_envd, "cat", "/proc/self/status"))
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) == 0


def test_oom_score_is_raised(spawning_envd: EnvdProcess) -> None:
    assert run(spawning_envd, "cat", "/proc/self/oom_score_adj").strip() == "100"


def test_only_the_standard_streams_are_inherited(spawning_envd: EnvdProcess) -> None:
    # ls opens the directory it lists, so a fourth descriptor is its own.
    listed = {int(fd) for fd in run(spawning_envd, "ls", "-1", "/proc/self/fd").split()}
    assert {0, 1, 2} <= listed <= {0, 1, 2, 3}


def test_starts_in_the_user_cgroup(spawning_envd: EnvdProcess) -> None:
    layout = layout_of(spawning_envd.proc.pid)
    text = run(spawning_envd, "cat", "/proc/self/cgroup")
    name = f"/wrenn-user-{spawning_envd.proc.pid}"
    lines = [line for line in text.splitlines() if line]
    assert len([line for line in lines if line.endswith(name)]) == len(layout.hierarchies)


def test_a_terminal_is_the_users_controlling_terminal(spawning_envd: EnvdProcess) -> None:
    stat_line = run_on_pty(spawning_envd, "cat", "/proc/self/stat")
    pid, rest = stat_line.split(" (", 1)
    fields = rest.rsplit(") ", 1)[1].split()
    pgrp, session, tty_nr, tpgid = (int(f) for f in fields[2:6])
    assert pgrp == session == tpgid == int(pid)
    assert tty_nr != 0
    owner = run_on_pty(spawning_envd, "stat", "-L", "-c", "%U", "/proc/self/fd/0")
    assert owner.strip() == NOBODY


def test_a_directory_the_user_cannot_reach_still_works(
    spawning_envd: EnvdProcess, tmp_path: Path
) -> None:
    # tmp_path's parents are root-only: the process starts there all the same, as before.
    inner = tmp_path / "inner"
    inner.mkdir(mode=0o755)
    assert run(spawning_envd, "pwd", cwd=str(inner)).strip() == str(inner)


def test_a_program_the_user_may_not_run_is_invalid(
    spawning_envd: EnvdProcess, tmp_path: Path
) -> None:
    script = tmp_path / "root-only"
    script.write_text("#!/bin/sh\necho no\n")
    script.chmod(stat.S_IRWXU)
    with pytest.raises(ConnectError) as info:
        run(spawning_envd, str(script))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "permission denied" in info.value.message


def test_a_program_looked_up_in_path_as_the_user(spawning_envd: EnvdProcess) -> None:
    assert run(spawning_envd, "id", "-un").strip() == NOBODY
    with pytest.raises(ConnectError) as info:
        run(spawning_envd, "no-such-program-anywhere")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "no such file" in info.value.message


# --- the spawner in this process --------------------------------------------------------------


def spec(user: str, *argv: str, cwd: str = "/") -> LaunchSpec:
    who = lookup(user)
    env = environment(who, Defaults(), {}, pty=False)
    return LaunchSpec(argv=argv, env=env, cwd=cwd, user=who, pty=None, stdin=False)


@contextlib.asynccontextmanager
async def spawner(cgroup_fds: tuple[int, ...] = (), *, fast: bool) -> AsyncIterator[Spawner]:
    made = Spawner(cgroup_fds, fast=fast)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.mark.parametrize("fast", [True, False], ids=["gated", "forked"])
async def test_a_child_that_cannot_join_its_cgroup_never_runs(fast: bool, tmp_path: Path) -> None:
    # A descriptor that cannot be written stands in for a cgroup that refuses the child.
    unwritable = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    marker = tmp_path / "ran"
    try:
        async with spawner((unwritable,), fast=fast) as made:
            with pytest.raises(Internal):
                await made.spawn(spec("root", "touch", str(marker)))
            assert made.gated == (fast and gate_available())
    finally:
        os.close(unwritable)
    assert not marker.exists()


async def output_of(made: Spawner, user: str, *argv: str) -> str:
    spawned = await made.spawn(spec(user, *argv))
    try:
        assert await asyncio.to_thread(spawned.child.wait) == 0
        assert spawned.stdout_fd is not None
        os.set_blocking(spawned.stdout_fd, True)
        return os.read(spawned.stdout_fd, 4096).decode()
    finally:
        for fd in (spawned.pidfd, spawned.stdout_fd, spawned.stderr_fd):
            if fd is not None:
                os.close(fd)


@pytest.mark.parametrize("fast", [True, False], ids=["gated", "forked"])
async def test_concurrent_starts_as_different_users_keep_their_identities(fast: bool) -> None:
    users = ["root", NOBODY] * 6
    async with spawner(fast=fast) as made:
        outputs = await asyncio.gather(*(output_of(made, u, "id", "-un") for u in users))
    assert [o.strip() for o in outputs] == users


@pytest.mark.parametrize("fast", [True, False], ids=["gated", "forked"])
async def test_envds_own_working_directory_stays(fast: bool, tmp_path: Path) -> None:
    before = os.getcwd()
    async with spawner(fast=fast) as made:
        spawned = await made.spawn(spec(NOBODY, "true", cwd=str(tmp_path)))
        try:
            assert await asyncio.to_thread(spawned.child.wait) == 0
        finally:
            for fd in (spawned.pidfd, spawned.stdout_fd, spawned.stderr_fd):
                if fd is not None:
                    os.close(fd)
    assert os.getcwd() == before
