"""A running VM and what it holds: a network slot, a run directory, its memory file (QEMU),
the VMM process, envd clients, and (Firecracker) a page server. ``start`` acquires them in
that order and pushes each undo step the moment its resource exists; ``Instance.close`` (and
any failure during ``start``) unwinds them all: VMM stopped, memory copy deleted, run
directory removed, slot reset and returned.

    start(ColdBoot)   slot → run dir → VMM boots the image → envd /health (bounded)
    start(FromBuild)  slot → run dir → memory copy → VMM restores the build → envd /health

The slot is reset in the background after the VM is gone (``SlotPool.release_soon``). A VM
that stops for good right after a snapshot (a pause) hands its memory copy over as the
build's memory image (``keep_memory_as``), so resuming that build copies no memory.

The disk is not the instance's: it belongs to the sandbox and outlives a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from wrenn import log
from wrenn.agent import leftovers
from wrenn.agent.cleanup import finish
from wrenn.agent.config import AgentSettings
from wrenn.agent.envdclient import EnvdClient, never_sent
from wrenn.agent.guestconns import GuestConnections
from wrenn.agent.images import GuestImage
from wrenn.agent.memory import MemoryImages, VmMemory
from wrenn.agent.network import Slot, SlotPool
from wrenn.agent.runtime import Runtime
from wrenn.agent.snapshots import DeviceInput, Manifest, SnapshotStore
from wrenn.agent.steps import Steps
from wrenn.agent.vmm.base import NetworkAttachment, VmConfig, Vmm
from wrenn.agent.workingset import WorkingSets
from wrenn.core.errors import DeadlineExceeded, Unavailable

_log = log.get(__name__)

ENVD_PORT = 49983


class GuestFailed(Unavailable):
    """The VMM died or the guest never answered; the message carries the logs' tail."""


@dataclass(frozen=True)
class HostResources:
    """What every instance on this host draws from."""

    settings: AgentSettings
    runtime: Runtime
    pool: SlotPool
    store: SnapshotStore
    memory: MemoryImages
    #: Parent of every VM's run directory.
    vm_root: Path
    #: What restores of each build touch, read ahead into new memory copies (QEMU).
    working_sets: WorkingSets = field(default_factory=WorkingSets)


@dataclass(frozen=True)
class ColdBoot:
    """Boot the image's kernel on the disk (template builds only)."""


@dataclass(frozen=True)
class FromBuild:
    """Restore a build (template, named snapshot, pause). QEMU: the VM gets a reflinked copy
    of the build's memory image."""

    build_id: uuid.UUID


@dataclass(frozen=True)
class Shape:
    """What the VM is made of."""

    image: GuestImage
    vcpus: int
    memory_mib: int
    disk: Path
    internet_access: bool = False


class Instance:
    def __init__(
        self,
        slot: Slot,
        vmm: Vmm,
        envd: EnvdClient,
        run_dir: Path,
        stack: contextlib.AsyncExitStack,
        runtime: Runtime,
        memory: VmMemory | None = None,
    ) -> None:
        self.slot = slot
        self.vmm = vmm
        self.envd = envd
        self.run_dir = run_dir
        self._stack = stack
        self._runtime = runtime
        self._memory = memory
        #: Relayed WebSockets into the guest, closed before a pause and when the VM stops.
        self.connections = GuestConnections()
        stack.push_async_callback(self.connections.close_all, "sandbox stopping")

    @property
    def address(self) -> str:
        """The host-reachable address of the guest (every port)."""
        return self.slot.sandbox_ip

    def logs(self) -> str:
        return self._runtime.logs(self.vmm)

    async def capture(
        self,
        store: SnapshotStore,
        build_id: uuid.UUID,
        parent: uuid.UUID | None,
        steps: Steps | None = None,
    ) -> Manifest:
        """envd ``/snapshot/prepare`` → close the agent's idle envd connections and relayed
        WebSockets (their FINs reach the guest while it still runs) → pause → snapshot → store
        the build (memory as a diff over ``parent``'s, generation 0 without one). Leaves the VM
        paused: the caller resumes it or closes the instance. The store reads QEMU's guest RAM
        file in place, which holds while the guest stays paused."""
        steps = steps or Steps()
        await self.envd.prepare_snapshot()
        steps.mark("prepare")
        await asyncio.gather(self.envd.close_idle(), self.connections.close_all("sandbox pausing"))
        steps.mark("close_idle")
        await self.vmm.pause()
        steps.mark("pause")
        dest = self.run_dir / "snapshot"
        try:
            files = await self._runtime.snapshot(self.vmm, dest)
            steps.mark("snapshot")
            changed = None
            memory = self._memory
            if memory is not None and parent == memory.source and files.memfile == memory.path:
                changed = await memory.changed_ranges()
                steps.mark("extents")
            manifest = await store.create(
                build_id,
                parent=parent,
                devices={"memfile": DeviceInput(source=files.memfile, changed_ranges=changed)},
                files={"state": files.state},
            )
            steps.mark("store")
            return manifest
        finally:
            await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)

    def keep_memory_as(self, build_id: uuid.UUID) -> None:
        """The VM's memory holds exactly ``build_id``'s (captured, and the guest will not run
        again): ``close`` makes it that build's memory image."""
        if self._memory is not None:
            self._memory.keep_as = build_id

    async def close(self) -> None:
        """Stop the VM and give back everything it held. Idempotent; runs to its end even if
        the caller is cancelled."""
        await finish(self._stack.aclose())


#: A restored guest's first request, in place of polling /health (the host agent's /init).
FirstCall = Callable[[EnvdClient], Awaitable[None]]


async def _wait_envd(
    runtime: Runtime,
    vmm: Vmm,
    envd: EnvdClient,
    timeout_s: float,
    what: str,
    first_call: FirstCall | None = None,
) -> float:
    """Poll envd's /health, or send ``first_call`` until envd can be reached; fail fast when
    the VMM exits, and after ``timeout_s``. ``first_call`` is sent again only when it never
    left (envd not reachable yet), so it need not be idempotent."""
    start = time.monotonic()
    while True:
        if vmm.pid is None:
            raise GuestFailed(f"the VM exited during {what}\n{runtime.logs(vmm)}")
        if first_call is None:
            if await envd.health():
                return time.monotonic() - start
        else:
            try:
                await first_call(envd)
            except (Unavailable, DeadlineExceeded) as err:
                if not never_sent(err):
                    raise
            else:
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise DeadlineExceeded(
                f"envd did not answer within {timeout_s:.0f} s of {what}\n{runtime.logs(vmm)}"
            )
        await asyncio.sleep(0.05 if first_call is None else 0.01)


async def _settle(task: asyncio.Task[int]) -> None:
    await asyncio.wait([task])


async def start(
    host: HostResources,
    *,
    name: str,
    shape: Shape,
    source: ColdBoot | FromBuild,
    envd_access_token: str | None = None,
    first_call: FirstCall | None = None,
    steps: Steps | None = None,
) -> Instance:
    """A VM of ``shape`` running in a free slot with envd answering. ``envd_access_token``:
    the token envd in a restored build already requires. ``first_call``: what to send a
    restored guest first, in place of /health: its envd already listens, and under TCG every
    first request into a restored guest costs translation time (~130 ms), so a /health before
    the /init would pay twice. Nothing is left behind on failure."""
    runtime = host.runtime
    steps = steps or Steps()
    stack = contextlib.AsyncExitStack()
    try:
        slot = await host.pool.acquire(internet_access=shape.internet_access)
        # Reset in the background once the VM is gone: a create that finds no free slot
        # waits for it.
        stack.callback(host.pool.release_soon, slot)
        steps.mark("slot")

        run_dir = host.vm_root / f"{name}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(run_dir.mkdir, parents=True)
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)

        config = VmConfig(
            vm_id=name,
            vcpus=shape.vcpus,
            memory_mib=shape.memory_mib,
            kernel=runtime.kernel(shape.image),
            initrd=shape.image.initrd,
            rootfs=shape.disk,
            run_dir=run_dir,
            kernel_args=runtime.kernel_args(shape.image),
            network=NetworkAttachment(tap=slot.tap_name, mac=slot.guest_mac, netns=slot.netns),
        )
        memfile: Path | None = None
        memory: VmMemory | None = None
        if isinstance(source, FromBuild) and runtime.flat_memory:
            memory = VmMemory(host.memory, run_dir.name, source.build_id)
            memfile = await host.memory.copy_for(source.build_id, memory.vm)
            stack.push_async_callback(memory.release)
            steps.mark("memory")
            # Read ahead while QEMU starts (asking can block for a while when the device is
            # busy); waited for before the copy can be deleted.
            prefetch = asyncio.create_task(host.working_sets.prefetch(source.build_id, memfile))
            stack.push_async_callback(_settle, prefetch)
        vmm = runtime.vmm(config)
        stack.push_async_callback(vmm.stop)
        if isinstance(source, ColdBoot):
            what = "a cold boot"
            timeout_s = host.settings.boot_timeout_s
            await vmm.boot()
        else:
            what = "a restore"
            timeout_s = host.settings.restore_timeout_s
            await runtime.restore(
                vmm,
                store=host.store,
                build_id=source.build_id,
                memfile=memfile,
                run_dir=run_dir,
                stack=stack,
            )
        if vmm.pid is not None:
            await asyncio.to_thread(leftovers.write_pid, run_dir, vmm.pid)
        steps.mark("boot" if isinstance(source, ColdBoot) else "restore")

        envd = EnvdClient(f"http://{slot.sandbox_ip}:{ENVD_PORT}", envd_access_token or None)
        stack.push_async_callback(envd.aclose)
        waited_s = await _wait_envd(runtime, vmm, envd, timeout_s, what, first_call)
        steps.mark("envd_health" if first_call is None else "init")
        if memfile is not None and isinstance(source, FromBuild):
            await host.working_sets.record(source.build_id, memfile)
    except BaseException:
        await finish(stack.aclose())
        raise
    _log.info(
        "vm.ready",
        vm=name,
        slot=slot.index,
        address=slot.sandbox_ip,
        pid=vmm.pid,
        source=what,
        envd_wait_s=round(waited_s, 3),
    )
    return Instance(slot, vmm, envd, run_dir, stack, runtime, memory)
