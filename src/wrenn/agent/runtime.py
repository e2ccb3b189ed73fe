"""Which VMM runs sandboxes on this host, and why; and what differs between the drivers in the
agent's flows (the kernel they boot, how a snapshot's memory comes back).

    auto          firecracker when its binary runs *and* a guest kernel really boots under KVM
                  (a KVM device can open and still fail to run a guest: nested or PVM-backed
                  KVM); qemu otherwise, with the accelerator ``probe_accel`` picks
    qemu          forced; accelerator from ``qemu_accel`` (auto: the KVM boot probe)
    firecracker   forced; the agent refuses to start when the binary or KVM is unusable

Restores: qemu maps the VM's own reflinked copy of the build's memory shared
(``MemoryImages``); firecracker loads the state with the Uffd backend and our page server reads
the build's layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

from wrenn import log
from wrenn.agent.config import AgentSettings
from wrenn.agent.images import GuestImage
from wrenn.agent.network import kernel_ip_arg
from wrenn.agent.snapshots import SnapshotStore
from wrenn.agent.uffd import UffdServer
from wrenn.agent.vmm.base import SnapshotFiles, VmConfig, Vmm
from wrenn.agent.vmm.firecracker import DEFAULT_KERNEL_ARGS, FirecrackerVmm, firecracker_usable
from wrenn.agent.vmm.qemu import QemuVmm, probe_accel
from wrenn.core.errors import FailedPrecondition

_log = log.get(__name__)

VmmName = Literal["qemu", "firecracker"]
Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class RuntimeChoice:
    vmm: VmmName
    accel: Accel
    reason: str

    @property
    def label(self) -> str:
        """What a snapshot taken here can be restored by: ``firecracker``, ``qemu-kvm`` or
        ``qemu-tcg`` (a TCG snapshot does not load under KVM and the other way round)."""
        return "firecracker" if self.vmm == "firecracker" else f"qemu-{self.accel}"


async def _qemu_accel(settings: AgentSettings, kernel: Path) -> tuple[Accel, str]:
    if settings.qemu_accel != "auto":
        return (
            settings.qemu_accel,
            f"accelerator {settings.qemu_accel} set by WRENN_AGENT_QEMU_ACCEL",
        )
    probe = await probe_accel(kernel, qemu_bin=settings.qemu_bin)
    return probe.accel, probe.reason


async def choose(settings: AgentSettings, image: GuestImage) -> RuntimeChoice:
    """Probe this host and pick the runtime (see the module docstring)."""
    if settings.runtime == "qemu":
        accel, why = await _qemu_accel(settings, image.kernel)
        return RuntimeChoice("qemu", accel, f"qemu set by WRENN_AGENT_RUNTIME; {why}")
    fc = await firecracker_usable(settings.firecracker_bin)
    if settings.runtime == "firecracker":
        if not fc.usable:
            raise FailedPrecondition(f"WRENN_AGENT_RUNTIME=firecracker, but {fc.reason}")
        return RuntimeChoice("firecracker", "kvm", "firecracker set by WRENN_AGENT_RUNTIME")
    if not fc.usable:
        accel, why = await _qemu_accel(settings, image.kernel)
        return RuntimeChoice("qemu", accel, f"firecracker unusable ({fc.reason}); {why}")
    probe = await probe_accel(image.kernel, qemu_bin=settings.qemu_bin)
    if probe.accel == "kvm":
        note = f"; {fc.reason}" if fc.reason else ""
        return RuntimeChoice(
            "firecracker", "kvm", f"firecracker {fc.version} runs and {probe.reason}{note}"
        )
    return RuntimeChoice(
        "qemu", "tcg", f"firecracker {fc.version} runs but KVM cannot boot guests: {probe.reason}"
    )


class Runtime:
    """Makes VMs for the chosen runtime and restores snapshot builds into them."""

    def __init__(self, choice: RuntimeChoice, settings: AgentSettings) -> None:
        self.choice = choice
        self._settings = settings

    @property
    def label(self) -> str:
        return self.choice.label

    def kernel(self, image: GuestImage) -> Path:
        return image.vmlinux if self.choice.vmm == "firecracker" else image.kernel

    def kernel_args(self, image: GuestImage) -> str:
        args = f"{image.kernel_args()} {kernel_ip_arg()}"
        return f"{DEFAULT_KERNEL_ARGS} {args}" if self.choice.vmm == "firecracker" else args

    def vmm(self, config: VmConfig) -> Vmm:
        if self.choice.vmm == "firecracker":
            return FirecrackerVmm(config, firecracker_bin=self._settings.firecracker_bin)
        return QemuVmm(config, accel=self.choice.accel, qemu_bin=self._settings.qemu_bin)

    def logs(self, vmm: Vmm, lines: int = 15) -> str:
        """The tail of the VMM's log and the guest's serial console, for error messages."""
        if isinstance(vmm, QemuVmm):
            return vmm.logs(lines)
        if isinstance(vmm, FirecrackerVmm):
            return f"--- firecracker log ---\n{vmm.logs()}\n--- serial console ---\n{vmm.serial()}"
        return ""

    async def snapshot(self, vmm: Vmm, dest: Path) -> SnapshotFiles:
        """Snapshot the paused ``vmm`` into ``dest``. QEMU hands over the guest's own RAM file
        rather than a copy of it: the caller must read it before the guest runs again."""
        if isinstance(vmm, QemuVmm):
            return await vmm.snapshot(dest, copy_memory=False)
        return await vmm.snapshot(dest)

    @property
    def flat_memory(self) -> bool:
        """Whether a restore maps a flat memory file (QEMU) rather than being served pages
        from the build's layers (Firecracker)."""
        return self.choice.vmm == "qemu"

    async def restore(
        self,
        vmm: Vmm,
        *,
        store: SnapshotStore,
        build_id: UUID,
        memfile: Path | None,
        run_dir: Path,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        """Start ``vmm`` (created, not booted) from ``build_id``. QEMU maps ``memfile``, the
        VM's own copy of the build's memory, shared. What the restore holds beyond the VMM (a
        page server and its reader) goes on ``stack``, undone after the VM is gone."""
        state = await store.file(build_id, "state")
        if isinstance(vmm, FirecrackerVmm):
            reader = await store.open_device(build_id, "memfile")
            stack.callback(reader.close)
            prefetch = await store.prefetch(build_id)
            server = UffdServer(run_dir / "uffd.sock", reader, prefetch=prefetch)
            await server.start()

            async def stop_vm_then_server() -> None:
                await vmm.stop()
                await server.stop()

            stack.push_async_callback(stop_vm_then_server)
            await vmm.restore_uffd(state, server.socket_path)
            return
        if memfile is None:
            raise FailedPrecondition("a QEMU restore needs the guest's memory file")
        files = SnapshotFiles(memfile=memfile, state=state)
        if isinstance(vmm, QemuVmm):
            await vmm.restore(files, own_memory=True)
        else:
            await vmm.restore(files)
