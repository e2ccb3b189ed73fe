"""A running VM and what it holds: a network slot, a run directory, its memory file (QEMU),
the VMM process, envd clients, and (Firecracker) a page server. ``start`` acquires them in
that order and pushes each undo step the moment its resource exists; ``Instance.close`` (and
any failure during ``start``) unwinds them all: VMM stopped, memory copy deleted, run
directory removed, slot reset and returned.

    start(ColdBoot)   slot → run dir → VMM boots the image → envd /health (bounded)
    start(FromBuild)  slot → run dir → memory copy (its working set read ahead) → VMM
                      restores the build → the caller's first call (/init), or envd /health

The slot is reset in the background after the VM is gone (``SlotPool.release_soon``).

A snapshot is taken by ``capture`` (the build stored before it returns: templates, named
snapshots) or ``hold`` (a pause under QEMU: the build is held in the store with its device
state, and the paused VM's memory copy becomes the build's memory image; the memory is stored
later, in the background, and resuming the build copies no memory).

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
from wrenn.agent.network import Egress, Slot, SlotPool, peers
from wrenn.agent.runtime import Runtime
from wrenn.agent.snapshots import DeviceInput, Manifest, SnapshotStore
from wrenn.agent.steps import Steps
from wrenn.agent.vmm.base import NetworkAttachment, SnapshotFiles, VmConfig, Vmm
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
    of the build's memory image, or, with ``taken``, the image itself."""

    build_id: uuid.UUID
    #: The build is a pause whose store was called off (``PendingBuilds.take_over``): the VM
    #: maps the kept image itself (this, the paused VM's copy), still cached from before the
    #: pause, and the build can never be restored again.
    taken: VmMemory | None = None


@dataclass(frozen=True)
class Held:
    """A snapshot held in the store, its memory kept as the build's image (``hold``)."""

    build_id: uuid.UUID
    parent: uuid.UUID | None
    #: The VM was restored from ``parent``'s image, so the kept image's extent map tells which
    #: blocks the guest wrote (``MemoryImages.changed_ranges``).
    extents_known: bool


@dataclass(frozen=True)
class Shape:
    """What the VM is made of."""

    image: GuestImage
    vcpus: int
    memory_mib: int
    disk: Path
    egress: Egress = field(default_factory=Egress)


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
        """``freeze``, then store the build (memory as a diff over ``parent``'s, generation 0
        without one). Leaves the VM paused: the caller resumes it or closes the instance. The
        store reads QEMU's guest RAM file in place, which holds while the guest stays paused."""
        steps = steps or Steps()
        dest = self.run_dir / "snapshot"
        try:
            files = await self.freeze(dest, steps)
            return await self._store(store, build_id, parent, files, steps)
        finally:
            await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)

    async def hold(
        self,
        store: SnapshotStore,
        build_id: uuid.UUID,
        parent: uuid.UUID | None,
        steps: Steps | None = None,
    ) -> Held | Manifest:
        """``freeze``, then hold the build in the store (its device state) and make the VM's
        memory copy the build's memory image: the memory is stored later
        (``PendingBuilds``). The VM stays paused and must not run again unless the image is
        dropped first (it *is* the VM's memory). A VM without its own memory file (Firecracker)
        stores the build at once, as ``capture`` does, and returns its manifest."""
        steps = steps or Steps()
        dest = self.run_dir / "snapshot"
        try:
            files = await self.freeze(dest, steps)
            memory = self._memory
            if memory is None or files.memfile != memory.path:
                return await self._store(store, build_id, parent, files, steps)
            await store.hold(build_id, parent=parent, files={"state": files.state})
            steps.mark("hold")
            try:
                await memory.keep_as(build_id)
            except BaseException:
                await finish(store.release(build_id))
                raise
            steps.mark("keep")
            return Held(build_id, parent, extents_known=parent == memory.source)
        finally:
            await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)

    async def freeze(self, dest: Path, steps: Steps) -> SnapshotFiles:
        """envd ``/snapshot/prepare`` → close the agent's idle envd connections and relayed
        ones (their FINs reach the guest while it still runs), then abort every other host
        connection to the guest (the guest gets resets) → pause → the VMM's snapshot into
        ``dest`` (QEMU: the device state; the memory file is the VM's own)."""
        await self.envd.prepare_snapshot()
        steps.mark("prepare")
        await asyncio.gather(self.envd.close_idle(), self.connections.close_all("sandbox pausing"))
        await abort_peers(self.address)
        steps.mark("close_idle")
        await self.vmm.pause()
        steps.mark("pause")
        files = await self._runtime.snapshot(self.vmm, dest)
        steps.mark("snapshot")
        return files

    async def _store(
        self,
        store: SnapshotStore,
        build_id: uuid.UUID,
        parent: uuid.UUID | None,
        files: SnapshotFiles,
        steps: Steps,
    ) -> Manifest:
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

    async def close(self) -> None:
        """Stop the VM and give back everything it held. Idempotent; runs to its end even if
        the caller is cancelled."""
        await finish(self._stack.aclose())


async def abort_peers(address: str) -> None:
    """Abort the host's TCP connections to ``address`` (``network.peers``); a failure is
    logged, never raised: a pause or a stop goes on without it."""
    try:
        aborted = await asyncio.to_thread(peers.abort_connections_to, address)
    except OSError as err:
        _log.warning("vm.abort_connections_failed", address=address, error=str(err))
        return
    if aborted:
        _log.info("vm.connections_aborted", address=address, count=aborted)


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
        slot = await host.pool.acquire(egress=shape.egress)
        # Reset in the background once the VM is gone: a create that finds no free slot
        # waits for it.
        stack.callback(host.pool.release_soon, slot)
        # Once the VM is gone, before the address is anyone else's: host connections still
        # open to it would otherwise wait forever.
        stack.push_async_callback(abort_peers, slot.sandbox_ip)
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
        if isinstance(source, FromBuild) and runtime.flat_memory and source.taken:
            memory = source.taken
            memfile = memory.path
            stack.push_async_callback(memory.release)
        elif isinstance(source, FromBuild) and runtime.flat_memory:
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
        if memfile is not None and isinstance(source, FromBuild) and not source.taken:
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
