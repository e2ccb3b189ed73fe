"""User processes run in envd's user cgroup; the group goes away with envd."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EnvdProcess
from tests.envd.conftest import connect
from wrenn.envd.cgroups import GROUP_PREFIX, UNLIMITED_BYTES, Layout, detect


def membership(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; the v2 entry under the key ``""``."""
    paths: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def layout_of(pid: int) -> Layout:
    layout = detect("/sys/fs/cgroup", Path(f"/proc/{pid}"))
    if isinstance(layout, str):
        pytest.skip(f"no usable cgroup controller here: {layout}")
    return layout


def groups_of(envd: EnvdProcess) -> list[Path]:
    layout = layout_of(envd.proc.pid)
    return [h.own / f"{GROUP_PREFIX}{envd.proc.pid}" for h in layout.hierarchies]


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped, or a zombie awaiting its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@contextlib.contextmanager
def own_envd() -> Iterator[tuple[EnvdProcess, list[Path]]]:
    """An envd this test stops itself, with its user groups; they are removed here should
    envd fail to."""
    layout_of(os.getpid())  # skips before anything is started
    proc = EnvdProcess()
    groups: list[Path] = []
    try:
        groups = groups_of(proc)
        yield proc, groups
    finally:
        proc.stop()
        for group in groups:
            with contextlib.suppress(FileNotFoundError):
                group.rmdir()
        proc.log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")


def test_user_processes_run_in_the_user_group(fresh_envd: EnvdProcess) -> None:
    layout = layout_of(fresh_envd.proc.pid)
    sandbox = connect(fresh_envd)
    handle = sandbox.commands.run("sleep 300", background=True)
    try:
        name = f"{GROUP_PREFIX}{fresh_envd.proc.pid}"
        envd_paths = membership(fresh_envd.proc.pid)
        child_paths = membership(handle.pid)
        for hierarchy in layout.hierarchies:
            key = "" if layout.version == 2 else next(iter(hierarchy.controllers))
            assert child_paths[key] == envd_paths[key].rstrip("/") + "/" + name
            assert not envd_paths[key].endswith(name), "envd itself stays outside"
            group = hierarchy.own / name
            assert handle.pid in {int(p) for p in (group / "cgroup.procs").read_text().split()}
        # A grandchild forked right away is in the group too.
        nested = sandbox.commands.run("sh -c 'cat /proc/self/cgroup'").stdout
        assert f"/{name}\n" in nested
    finally:
        handle.kill()


def test_user_group_has_a_memory_limit_below_envds(fresh_envd: EnvdProcess) -> None:
    layout = layout_of(fresh_envd.proc.pid)
    memory = next(h for h in layout.hierarchies if "memory" in h.controllers)
    group = memory.own / f"{GROUP_PREFIX}{fresh_envd.proc.pid}"
    name = "memory.max" if layout.version == 2 else "memory.limit_in_bytes"
    limit = int((group / name).read_text())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < limit < min(total, UNLIMITED_BYTES)


def test_groups_removed_when_envd_stops() -> None:
    with own_envd() as (proc, groups):
        sandbox = connect(proc)
        child = int(sandbox.commands.run("sleep 300 & echo $!").stdout)
        try:
            assert all(group.is_dir() for group in groups)
            proc.stop()
            assert not any(group.exists() for group in groups)
            assert gone(child), "what was left running in the group went with it"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_no_controller_means_no_group_and_processes_still_run(tmp_path: Path) -> None:
    proc = EnvdProcess(env={"WRENN_ENVD_CGROUP_ROOT": str(tmp_path / "none")})
    try:
        sandbox = connect(proc)
        assert sandbox.commands.run("echo fine").stdout == "fine\n"
        assert GROUP_PREFIX not in sandbox.commands.run("cat /proc/self/cgroup").stdout
        assert "cgroups.unavailable" in proc.logs()
    finally:
        proc.stop()
        proc.log.unlink(missing_ok=True)


def test_detect_prefers_v2_with_a_memory_controller(tmp_path: Path) -> None:
    """``detect`` reads /proc files and the mounted tree; here both are stand-ins (a
    directory of fake /proc files and a plain directory as the v2 mount) because this
    machine's v2 hierarchy offers no controllers."""
    root = tmp_path / "cgroup"
    (root / "envd").mkdir(parents=True)
    (root / "envd" / "cgroup.controllers").write_text("cpu memory pids\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n"
        "35 31 0:32 / /elsewhere/memory rw,relatime - cgroup cgroup rw,memory\n"
    )
    (proc / "cgroup").write_text("0::/envd\n")
    layout = detect(str(root), proc)
    assert isinstance(layout, Layout)
    assert layout.version == 2
    assert layout.hierarchies[0].own == root / "envd"
    assert layout.hierarchies[0].controllers == {"cpu", "memory", "pids"}

    (root / "envd" / "cgroup.controllers").write_text("hugetlb\n")
    reason = detect(str(root), proc)
    assert isinstance(reason, str)
    assert "no memory controller" in reason
