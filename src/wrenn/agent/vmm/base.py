"""The interface every VMM driver implements, and the values that cross it.

States and allowed actions (a call outside its states raises ``FailedPrecondition``):

    created ──boot()/restore()──▶ running ──pause()──▶ paused ──resume()──▶ running
                                    │                    │
                                    └──────stop()────────┴──▶ stopped
    snapshot() is allowed only while paused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class VmState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class NetworkAttachment:
    """A tap device the guest's NIC is bound to, inside ``netns`` (None: the caller's)."""

    tap: str
    mac: str
    netns: str | None = None


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to boot a guest or restore one from a snapshot."""

    vm_id: str
    vcpus: int
    memory_mib: int
    kernel: Path
    rootfs: Path
    #: Working directory for sockets, the serial log and (qemu) the guest RAM file.
    run_dir: Path
    initrd: Path | None = None
    kernel_args: str = ""
    network: NetworkAttachment | None = None
    #: Key/value metadata offered to the guest (Firecracker MMDS; qemu: kernel cmdline).
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFiles:
    """A VMM snapshot on disk: guest memory, device/vCPU state, and the kind taken."""

    memfile: Path
    state: Path
    #: True when ``memfile`` holds only pages dirtied since the parent snapshot.
    diff: bool = False


@dataclass(frozen=True)
class VmMetrics:
    cpu_seconds: float
    rss_bytes: int


class Vmm(Protocol):
    """One VM, driven by one VMM process."""

    @property
    def state(self) -> VmState: ...

    @property
    def pid(self) -> int | None: ...

    async def boot(self) -> None:
        """Cold-boot the guest from kernel + rootfs. created → running."""

    async def restore(self, snapshot: SnapshotFiles) -> None:
        """Start from a snapshot instead of booting. created → running."""

    async def pause(self) -> None:
        """running → paused."""

    async def resume(self) -> None:
        """paused → running."""

    async def snapshot(self, dest: Path, *, diff: bool = False) -> SnapshotFiles:
        """Write a snapshot of the paused VM under ``dest``. Must be called while paused."""

    async def stop(self) -> None:
        """End the VMM process and release what it holds. Idempotent; any state → stopped."""

    async def metrics(self) -> VmMetrics: ...
