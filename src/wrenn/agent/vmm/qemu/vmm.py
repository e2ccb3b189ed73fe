"""``QemuVmm``: one guest in one QEMU process (microvm machine, KVM or TCG).

Guest RAM is a file (``memory-backend-file``). A booted guest maps ``<run_dir>/memory``
shared, so its RAM *is* that file; a restored guest maps the snapshot's memory file private
(copy-on-write), so one snapshot backs any number of guests and is never written.

Snapshots are QEMU migrations to a file descriptor passed over QMP, with ``x-ignore-shared``:
a shared RAM block is left out of the stream (its contents are the memory file), a private
one goes into it. Either way the snapshot's ``memfile`` holds the guest RAM, copied sparsely.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

from wrenn import log
from wrenn.agent.vmm.base import SnapshotFiles, VmConfig, VmMetrics, VmState
from wrenn.agent.vmm.qemu import hugepage_advice, memory
from wrenn.agent.vmm.qemu.args import Accel, Launch, argv, host_tsc_khz
from wrenn.agent.vmm.qemu.qmp import QmpClient
from wrenn.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
    Unimplemented,
    WrennError,
)

_log = log.get(__name__)

#: QEMU creates its QMP socket before it runs the guest: this bounds the wait for it.
START_TIMEOUT_S = 15.0
#: Loading a snapshot reads the device state (and private RAM); bounded generously for TCG.
RESTORE_TIMEOUT_S = 60.0
SNAPSHOT_TIMEOUT_S = 60.0
#: ``quit`` over QMP, then SIGKILL after this long.
QUIT_TIMEOUT_S = 5.0
_POLL_S = 0.01


class GuestFailed(Unavailable):
    """The QEMU process ended or the guest did not come up; the message carries the tail of
    the QEMU log and of the serial console."""


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class QemuVmm:
    """Implements ``wrenn.agent.vmm.base.Vmm``."""

    def __init__(
        self, config: VmConfig, *, accel: Accel = "tcg", qemu_bin: str = "qemu-system-x86_64"
    ) -> None:
        self.config = config
        self.accel: Accel = accel
        self._qemu_bin = qemu_bin
        self._state = VmState.CREATED
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QmpClient | None = None
        #: The file guest RAM is mapped from, and whether the mapping is shared.
        self._memory_file: Path | None = None
        self._share_memory = True

    # -- files in run_dir -------------------------------------------------------------------

    @property
    def qmp_socket(self) -> Path:
        return self.config.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        """The guest's serial console."""
        return self.config.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.config.run_dir / "qemu.log"

    @property
    def pid_file(self) -> Path:
        """QEMU's PID, for finding guests left running by an agent that died."""
        return self.config.run_dir / "qemu.pid"

    @property
    def ram_file(self) -> Path:
        """Guest RAM of a booted guest."""
        return self.config.run_dir / "memory"

    # -- Vmm --------------------------------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def _require(self, *states: VmState) -> None:
        if self._state not in states:
            allowed = ", ".join(s.value for s in states)
            raise FailedPrecondition(
                f"vm {self.config.vm_id} is {self._state.value}, not {allowed}"
            )

    async def boot(self) -> None:
        self._require(VmState.CREATED)
        self._memory_file, self._share_memory = self.ram_file, True
        self.ram_file.unlink(missing_ok=True)
        await self._start(incoming=False)
        self._state = VmState.RUNNING
        _log.info("vm.booted", vm_id=self.config.vm_id, accel=self.accel, pid=self.pid)

    async def restore(self, snapshot: SnapshotFiles, *, own_memory: bool = False) -> None:
        """Start from ``snapshot``. By default its memfile is mapped private and never written
        (one memfile backs many guests). ``own_memory``: the memfile is this guest's own copy,
        mapped shared as a booted guest's RAM is, so a snapshot leaves RAM out of the stream;
        the snapshot's state must then hold no RAM (taken from a guest whose RAM was shared)."""
        self._require(VmState.CREATED)
        if snapshot.diff:
            raise Unimplemented("the qemu driver restores only full snapshots")
        expected = self.config.memory_mib << 20
        size = snapshot.memfile.stat().st_size
        if size != expected:
            raise InvalidArgument(
                f"snapshot memory is {size >> 20} MiB, the vm has {self.config.memory_mib} MiB"
            )
        self._memory_file, self._share_memory = snapshot.memfile, own_memory
        await self._start(incoming=True)
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT_S):
                qmp = self._client()
                await qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
                )
                with snapshot.state.open("rb") as state:
                    await qmp.execute("getfd", {"fdname": "snapshot"}, fds=[state.fileno()])
                await qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
                await self._wait_migration("incoming")
                await qmp.execute("cont")
        except BaseException as err:
            await self._fail(err, "restore")
        self._state = VmState.RUNNING
        _log.info("vm.restored", vm_id=self.config.vm_id, accel=self.accel, pid=self.pid)

    async def pause(self) -> None:
        self._require(VmState.RUNNING)
        await self._client().execute("stop")
        self._state = VmState.PAUSED

    async def resume(self) -> None:
        self._require(VmState.PAUSED)
        await self._client().execute("cont")
        self._state = VmState.RUNNING

    async def snapshot(
        self, dest: Path, *, diff: bool = False, copy_memory: bool = True
    ) -> SnapshotFiles:
        """Write ``dest/state`` (devices, vCPUs, and private RAM if any) and ``dest/memfile``
        (guest RAM). Must be called while paused; the guest stays paused and can resume.

        ``copy_memory=False`` for a guest whose RAM is a shared file: no copy is made, the
        returned ``memfile`` is that file itself. It holds the snapshot's memory only while the
        guest stays paused, and belongs to the VM (never write or delete it)."""
        self._require(VmState.PAUSED)
        if diff:
            raise Unimplemented("the qemu driver writes only full snapshots")
        assert self._memory_file is not None
        _make_dir(dest)
        files = SnapshotFiles(memfile=dest / "memfile", state=dest / "state")
        qmp = self._client()
        async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )
            with files.state.open("wb") as state:
                await qmp.execute("getfd", {"fdname": "snapshot"}, fds=[state.fileno()])
            await qmp.execute("migrate", {"uri": "fd:snapshot"})
            await self._wait_migration("outgoing")
            if self._share_memory and not copy_memory:
                files = SnapshotFiles(memfile=self._memory_file, state=files.state)
            elif self._share_memory:
                await asyncio.to_thread(memory.copy_file, self._memory_file, files.memfile)
            else:
                pid = self.pid
                if pid is None:
                    raise Unavailable(f"vm {self.config.vm_id} has no QEMU process")
                await asyncio.to_thread(
                    memory.copy_process_memory, pid, self._memory_file, files.memfile
                )
        _log.info("vm.snapshotted", vm_id=self.config.vm_id, dest=str(dest))
        return files

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        qmp, self._qmp = self._qmp, None
        self._state = VmState.STOPPED
        if proc is not None and proc.returncode is None:
            if qmp is not None:
                with contextlib.suppress(WrennError, OSError, TimeoutError):
                    async with asyncio.timeout(QUIT_TIMEOUT_S):
                        await qmp.execute("quit")
            try:
                async with asyncio.timeout(QUIT_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        if qmp is not None:
            qmp.close()
        self.qmp_socket.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        self.ram_file.unlink(missing_ok=True)

    async def metrics(self) -> VmMetrics:
        pid = self.pid
        if pid is None:
            raise FailedPrecondition(f"vm {self.config.vm_id} has no QEMU process")
        return await asyncio.to_thread(_proc_metrics, pid)

    # -- beyond the protocol ----------------------------------------------------------------

    def logs(self, lines: int = 40) -> str:
        """The tail of QEMU's log and of the serial console, for error messages."""
        return (
            f"--- qemu log ---\n{_tail(self.qemu_log, lines)}\n"
            f"--- serial console ---\n{_tail(self.console_log, lines)}"
        )

    async def wait_until(
        self, probe: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str
    ) -> None:
        """Poll ``probe`` until it returns True. Raises ``GuestFailed`` as soon as QEMU exits
        (a guest panic ends it) and ``DeadlineExceeded`` after ``timeout_s``; both carry the
        logs. Boots under TCG take seconds: size ``timeout_s`` for that."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.pid is None:
                raise GuestFailed(f"QEMU exited while waiting for {what}\n{self.logs()}")
            if await probe():
                return
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{what} not within {timeout_s:.0f} s\n{self.logs()}")
            await asyncio.sleep(0.1)

    # -- internals --------------------------------------------------------------------------

    def _client(self) -> QmpClient:
        if self._qmp is None:
            raise FailedPrecondition(f"vm {self.config.vm_id} has no QMP connection")
        return self._qmp

    async def _start(self, *, incoming: bool) -> None:
        """Spawn QEMU and connect QMP; on any failure everything started is undone and the
        error carries QEMU's log."""
        assert self._memory_file is not None
        run_dir = self.config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        launch = Launch(
            accel=self.accel,
            qmp_socket=self.qmp_socket,
            console_log=self.console_log,
            pid_file=self.pid_file,
            memory_file=self._memory_file,
            share_memory=self._share_memory,
            incoming=incoming,
            tsc_khz=host_tsc_khz(),
        )
        command = argv(self._qemu_bin, self.config, launch)
        if self.config.network is not None and self.config.network.netns is not None:
            command = ["ip", "netns", "exec", self.config.network.netns, *command]
        try:
            with self.qemu_log.open("ab") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    # Guest RAM in small pages (see hugepage_advice): what an idle guest holds.
                    preexec_fn=hugepage_advice.installer() if hugepage_advice.supported() else None,
                )
            async with asyncio.timeout(START_TIMEOUT_S):
                self._qmp = await self._connect()
                status = await self._qmp.execute("query-status")
            expected = "inmigrate" if incoming else "running"
            if status.get("status") != expected:
                raise Internal(f"QEMU started in state {status.get('status')}, not {expected}")
        except BaseException as err:
            await self._fail(err, "start")

    async def _connect(self) -> QmpClient:
        while True:
            if self._proc is None or self._proc.returncode is not None:
                raise GuestFailed("QEMU exited during start")
            try:
                return await QmpClient.connect(self.qmp_socket)
            except Unavailable:
                await asyncio.sleep(_POLL_S)

    async def _wait_migration(self, direction: str) -> None:
        qmp = self._client()
        while True:
            status = await qmp.execute("query-migrate")
            state = status.get("status")
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                raise Internal(f"{direction} migration {state}: {status.get('error-desc', '')}")
            if direction == "incoming" and state is None:
                # The destination forgets the migration once it has loaded it.
                run = await qmp.execute("query-status")
                if run.get("status") != "inmigrate":
                    return
            await asyncio.sleep(_POLL_S)

    async def _fail(self, err: BaseException, during: str) -> NoReturn:
        """Stop everything and re-raise ``err`` as an error carrying the logs."""
        logs = self.logs()
        await asyncio.shield(self.stop())
        if isinstance(err, TimeoutError):
            raise DeadlineExceeded(f"QEMU {during} timed out\n{logs}") from err
        if isinstance(err, WrennError):
            raise GuestFailed(f"QEMU {during} failed: {err.message}\n{logs}") from err
        raise err


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _proc_metrics(pid: int) -> VmMetrics:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError as err:
        raise FailedPrecondition(f"QEMU process {pid} is gone") from err
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_seconds = (int(fields[11]) + int(fields[12])) / ticks
    rss_bytes = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    return VmMetrics(cpu_seconds=cpu_seconds, rss_bytes=rss_bytes)
