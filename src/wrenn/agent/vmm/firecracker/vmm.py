"""``FirecrackerVmm``: one guest in one Firecracker process, optionally jailed.

Files in ``run_dir``:

    firecracker.sock   the API socket (jailed: <chroot>/run/firecracker.socket instead)
    firecracker.log    Firecracker's own log, and its stderr
    serial.log         the guest's serial console (Firecracker's stdout)
    metrics.json       Firecracker's metrics, one JSON object per flush

The process runs in a session of its own, inside ``config.network.netns`` when set (``nsenter``,
or the jailer's ``--netns``). The guest NIC is always ``eth0`` and MMDS (V2) answers on it when
there is one; MMDS data is not part of a snapshot, so a restore puts ``config.metadata`` again.
Every boot enables dirty page tracking and every restore asks for it, so a diff snapshot can
follow any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import psutil

from wrenn import log
from wrenn.agent.vmm.base import SnapshotFiles, VmConfig, VmMetrics, VmState
from wrenn.agent.vmm.firecracker.api import FirecrackerClient, InstanceInfo, MemoryBackend
from wrenn.agent.vmm.firecracker.jailer import (
    JAILED_API_SOCKET,
    Jail,
    JailerConfig,
    jailer_argv,
    netns_path,
)
from wrenn.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)

_log = log.get(__name__)
_T = TypeVar("_T")

#: Firecracker binds its API socket within milliseconds; this bounds the wait for it.
START_TIMEOUT_S = 10.0
#: One configuration or state call.
API_TIMEOUT_S = 10.0
#: Writing guest memory to disk (about 0.5 s for 256 MiB on a slow host).
SNAPSHOT_TIMEOUT_S = 300.0
#: A load returns after the restore's own page faults were served (Uffd) or mapped (File).
RESTORE_TIMEOUT_S = 60.0
#: After SIGKILL, how long to wait for the process to be gone.
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.005

#: Used when ``VmConfig.kernel_args`` is empty: serial console, reboot = exit, no PCI probing.
DEFAULT_KERNEL_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
IFACE_ID = "eth0"
ROOT_DRIVE_ID = "rootfs"
#: Unix socket paths are limited to 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107


class VmmFailed(Unavailable):
    """The Firecracker process ended or never served its API; the message carries the tail of
    its log."""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class FirecrackerVmm:
    """Implements ``wrenn.agent.vmm.base.Vmm``.

    ``firecracker_bin``: a path or a name on PATH. ``jailer``: run it under the jailer (the
    VM id must then be a valid jail id; ``run_dir`` still holds the logs).
    """

    def __init__(
        self,
        config: VmConfig,
        *,
        firecracker_bin: str = "firecracker",
        jailer: JailerConfig | None = None,
    ) -> None:
        self.config = config
        self._bin = firecracker_bin
        self._jailer = jailer
        self._jail: Jail | None = None
        self._state = VmState.CREATED
        self._proc: asyncio.subprocess.Process | None = None
        #: The Firecracker process: our child, or (jailer with a new PID namespace) its child.
        self._pid: int | None = None
        self._client: FirecrackerClient | None = None
        self._snapshots = 0

    # -- what the caller can see -------------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def api_socket(self) -> Path:
        if self._jail is not None:
            return self._jail.api_socket
        return self.config.run_dir / "firecracker.sock"

    @property
    def log_path(self) -> Path:
        return self.config.run_dir / "firecracker.log"

    @property
    def serial_log_path(self) -> Path:
        return self.config.run_dir / "serial.log"

    @property
    def metrics_path(self) -> Path:
        return self.config.run_dir / "metrics.json"

    @property
    def chroot(self) -> Path | None:
        """The jail's root on the host, while jailed."""
        return self._jail.root if self._jail is not None else None

    @property
    def client(self) -> FirecrackerClient:
        """The API of the running process, for calls the ``Vmm`` interface does not cover."""
        if self._client is None:
            raise FailedPrecondition(f"vm {self.config.vm_id} has no firecracker process")
        return self._client

    def logs(self) -> str:
        return _tail(self.log_path, 40)

    def serial(self) -> str:
        return _tail(self.serial_log_path, 40)

    async def instance_info(self) -> InstanceInfo:
        """What Firecracker itself reports (``GET /``): its state and version."""
        return await self._call(self.client.describe_instance(), API_TIMEOUT_S)

    # -- lifecycle ---------------------------------------------------------------------------

    async def boot(self) -> None:
        self._expect("boot", VmState.CREATED)
        cfg = self.config
        try:
            await self._spawn()
            api = self.client
            await self._call(
                api.put_machine_config(
                    vcpu_count=cfg.vcpus, mem_size_mib=cfg.memory_mib, track_dirty_pages=True
                ),
                API_TIMEOUT_S,
            )
            initrd = self._stage_device(cfg.initrd, "initrd") if cfg.initrd is not None else None
            await self._call(
                api.put_boot_source(
                    self._stage_device(cfg.kernel, "vmlinux"),
                    boot_args=cfg.kernel_args or DEFAULT_KERNEL_ARGS,
                    initrd_path=initrd,
                ),
                API_TIMEOUT_S,
            )
            await self._call(
                api.put_drive(
                    ROOT_DRIVE_ID,
                    self._stage_device(cfg.rootfs, "rootfs", writable=True),
                    is_root_device=True,
                ),
                API_TIMEOUT_S,
            )
            if cfg.network is not None:
                await self._call(
                    api.put_network_interface(IFACE_ID, cfg.network.tap, guest_mac=cfg.network.mac),
                    API_TIMEOUT_S,
                )
                await self._call(api.put_mmds_config([IFACE_ID], version="V2"), API_TIMEOUT_S)
            if cfg.metadata:
                await self._call(api.put_mmds(cfg.metadata), API_TIMEOUT_S)
            await self._call(api.start_instance(), API_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        self._state = VmState.RUNNING
        _log.info("vm.booted", vm_id=cfg.vm_id, pid=self._pid, vmm="firecracker")

    async def restore(self, snapshot: SnapshotFiles, *, resume: bool = True) -> None:
        """Load a full snapshot with the File backend (the memory file is mapped privately, so
        one file backs any number of VMs). ``resume=False`` leaves the VM paused."""
        self._expect("restore", VmState.CREATED)
        if snapshot.diff:
            raise InvalidArgument(
                "a diff memory file holds only dirtied pages: merge it onto its parent, "
                "or serve it through a page server (restore_uffd)"
            )
        await self._load(
            snapshot.state,
            lambda: MemoryBackend("File", self._stage(snapshot.memfile, "memfile")),
            resume=resume,
        )

    async def restore_uffd(
        self, state_file: Path, uffd_socket: Path, *, resume: bool = True
    ) -> None:
        """Load a snapshot with the Uffd backend: Firecracker connects to ``uffd_socket``, where
        the caller's page server must already listen, hands it the userfaultfd and the guest
        memory regions, and every page is then filled by that server. The call returns once
        the faults the restore itself takes have been served."""
        self._expect("restore", VmState.CREATED)
        await self._load(
            state_file,
            lambda: MemoryBackend("Uffd", self._stage(uffd_socket, "uffd.sock", writable=True)),
            resume=resume,
        )

    async def pause(self) -> None:
        self._expect("pause", VmState.RUNNING)
        await self._call(self.client.pause(), API_TIMEOUT_S)
        self._state = VmState.PAUSED
        _log.info("vm.paused", vm_id=self.config.vm_id)

    async def resume(self) -> None:
        self._expect("resume", VmState.PAUSED)
        await self._call(self.client.resume(), API_TIMEOUT_S)
        self._state = VmState.RUNNING
        _log.info("vm.resumed", vm_id=self.config.vm_id)

    async def snapshot(self, dest: Path, *, diff: bool = False) -> SnapshotFiles:
        """``dest/memfile`` and ``dest/state``. A diff memfile is sparse, the size of guest
        memory, holding only the pages dirtied since the previous snapshot (or the boot or
        restore); holes read as zeros but mean "unchanged"."""
        self._expect("snapshot", VmState.PAUSED)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        files = SnapshotFiles(memfile=dest / "memfile", state=dest / "state", diff=diff)
        self._snapshots += 1
        if self._jail is None:
            memfile, state = files.memfile, files.state
        else:
            work = Path(f"/snapshot-{self._snapshots}")
            self._jail.make_dir(work)
            memfile, state = work / "memfile", work / "state"
        await self._call(
            self.client.create_snapshot(snapshot_path=state, mem_file_path=memfile, diff=diff),
            SNAPSHOT_TIMEOUT_S,
        )
        if self._jail is not None:
            for jailed, final in ((memfile, files.memfile), (state, files.state)):
                await asyncio.to_thread(shutil.move, self._jail.host_path(jailed), final)
            self._jail.host_path(memfile).parent.rmdir()
        _log.info("vm.snapshotted", vm_id=self.config.vm_id, diff=diff, dest=str(dest))
        return files

    async def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the MMDS contents (any state with a process)."""
        await self._call(self.client.put_mmds(metadata), API_TIMEOUT_S)

    async def stop(self) -> None:
        """Kill the process by PID, reap it, remove the API socket (and the jail). Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        pid, proc = self._pid, self._proc
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await self._wait_gone(pid, proc)
            _log.info("vm.stopped", vm_id=self.config.vm_id, pid=pid)
        self._pid = self._proc = None
        if self._jail is not None:
            await asyncio.to_thread(self._jail.remove)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.api_socket.unlink()
        self._state = VmState.STOPPED

    async def metrics(self) -> VmMetrics:
        """CPU time and resident memory of the Firecracker process, from /proc."""
        if self._pid is None:
            raise FailedPrecondition(f"vm {self.config.vm_id} has no firecracker process")
        try:
            proc = psutil.Process(self._pid)
            times, memory = proc.cpu_times(), proc.memory_info()
        except psutil.NoSuchProcess as err:
            raise VmmFailed(f"firecracker of vm {self.config.vm_id} is gone") from err
        return VmMetrics(cpu_seconds=times.user + times.system, rss_bytes=memory.rss)

    # -- internals ---------------------------------------------------------------------------

    def _expect(self, action: str, *states: VmState) -> None:
        if self._state not in states:
            allowed = " or ".join(s.value for s in states)
            raise FailedPrecondition(
                f"cannot {action} vm {self.config.vm_id}: it is {self._state.value}, not {allowed}"
            )

    async def _call(self, call: Awaitable[_T], timeout_s: float) -> _T:
        try:
            async with asyncio.timeout(timeout_s):
                return await call
        except TimeoutError as err:
            raise DeadlineExceeded(
                f"firecracker of vm {self.config.vm_id} did not answer in {timeout_s:g} s"
            ) from err
        except Unavailable as err:
            if self._process_exited():
                raise VmmFailed(
                    f"firecracker of vm {self.config.vm_id} exited:\n{self.logs()}"
                ) from err
            raise

    def _stage(self, path: Path, name: str, *, writable: bool = False) -> Path:
        """The path Firecracker must be given for a file it uses without recording it (memory
        file, snapshot state, uffd socket): ``/<name>`` in the jail, else ``path`` itself."""
        if self._jail is not None:
            return self._jail.stage(path, name, writable=writable)
        return path.absolute()

    def _stage_device(self, path: Path, name: str, *, writable: bool = False) -> Path:
        """The path Firecracker must be given for a boot file or disk: ``/<name>`` in the jail,
        else ``<name>`` relative to ``run_dir`` (its working directory), a symlink to
        ``path``. Snapshots record these names, not the files behind them, so a snapshot
        restores onto whichever disk the restoring VM's config names."""
        if self._jail is not None:
            return self._jail.stage(path, name, writable=writable)
        link = self.config.run_dir / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(path.absolute())
        return Path(name)

    def _resolve_bin(self) -> Path:
        found = shutil.which(self._bin)
        if found is None:
            raise FailedPrecondition(f"firecracker binary not found: {self._bin}")
        return Path(found).resolve()

    def _argv(self, firecracker_bin: Path) -> list[str]:
        cfg = self.config
        netns = cfg.network.netns if cfg.network is not None else None
        if self._jail is not None and self._jailer is not None:
            log_path = self._jail.stage(self.log_path, "firecracker.log", writable=True)
            metrics_path = self._jail.stage(self.metrics_path, "metrics.json", writable=True)
            fc_args = self._fc_args(JAILED_API_SOCKET, log_path, metrics_path)
            return jailer_argv(
                self._jailer,
                vm_id=cfg.vm_id,
                firecracker_bin=firecracker_bin,
                netns=netns,
                firecracker_args=fc_args,
            )
        argv = [
            str(firecracker_bin),
            "--id",
            cfg.vm_id,
            *self._fc_args(self.api_socket, self.log_path, self.metrics_path),
        ]
        if netns is not None:
            argv = ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
        return argv

    def _fc_args(self, api_socket: Path, log_path: Path, metrics_path: Path) -> list[str]:
        return [
            "--api-sock",
            str(api_socket),
            "--log-path",
            str(log_path),
            "--level",
            "Info",
            "--show-level",
            "--metrics-path",
            str(metrics_path),
        ]

    async def _spawn(self) -> None:
        cfg = self.config
        firecracker_bin = self._resolve_bin()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if self._jailer is not None:
            self._jail = Jail(self._jailer, firecracker_bin, cfg.vm_id)
            await asyncio.to_thread(self._jail.prepare)
        sock = self.api_socket
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH_BYTES:
            raise InvalidArgument(f"API socket path too long for a unix socket: {sock}")
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        for path in (self.log_path, self.metrics_path):
            path.touch()
        argv = self._argv(firecracker_bin)
        with self.serial_log_path.open("ab") as serial, self.log_path.open("ab") as errors:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=serial,
                stderr=errors,
                cwd=cfg.run_dir,
                start_new_session=True,
            )
        self._pid = self._proc.pid
        self._client = FirecrackerClient(sock)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await self._wait_api()
        except TimeoutError as err:
            raise VmmFailed(
                f"firecracker of vm {cfg.vm_id} did not serve its API in {START_TIMEOUT_S:g} s:"
                f"\n{self.logs()}"
            ) from err
        _log.debug("vm.vmm_started", vm_id=cfg.vm_id, pid=self._pid, argv=argv)

    async def _wait_api(self) -> None:
        forked = self._jailer is not None and self._jailer.new_pid_ns
        while True:
            if not forked and self._process_exited():
                raise VmmFailed(f"firecracker of vm {self.config.vm_id} exited:\n{self.logs()}")
            if self.api_socket.exists():
                try:
                    await self.client.describe_instance()
                except Unavailable:
                    pass
                else:
                    break
            await asyncio.sleep(_POLL_S)
        if forked and self._jail is not None:
            # The jailer forked Firecracker into its PID namespace and exits: follow the child.
            self._pid = int(self._jail.pid_file.read_text().strip())
            if self._proc is not None:
                await self._proc.wait()
            self._proc = None

    def _process_exited(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is not None
        if self._pid is None:
            return True
        try:
            return bool(psutil.Process(self._pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    async def _wait_gone(self, pid: int, proc: asyncio.subprocess.Process | None) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                if proc is not None and proc.pid == pid:
                    await proc.wait()
                    return
                while True:
                    try:
                        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                            return
                    except psutil.NoSuchProcess:
                        return
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            _log.warning("vm.stop_timeout", vm_id=self.config.vm_id, pid=pid)

    async def _load(
        self,
        state_file: Path,
        backend: Callable[[], MemoryBackend],
        *,
        resume: bool,
    ) -> None:
        cfg = self.config
        try:
            await self._spawn()
            api = self.client
            # The snapshot names the root disk as staged at boot: stage this VM's disk there.
            self._stage_device(cfg.rootfs, "rootfs", writable=True)
            overrides = {IFACE_ID: cfg.network.tap} if cfg.network is not None else None
            await self._call(
                api.load_snapshot(
                    snapshot_path=self._stage(state_file, "state"),
                    mem_backend=backend(),
                    resume_vm=resume,
                    enable_diff_snapshots=True,
                    network_overrides=overrides,
                ),
                RESTORE_TIMEOUT_S,
            )
            if cfg.metadata:
                await self._call(api.put_mmds(cfg.metadata), API_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        self._state = VmState.RUNNING if resume else VmState.PAUSED
        _log.info("vm.restored", vm_id=cfg.vm_id, pid=self._pid, resumed=resume)
