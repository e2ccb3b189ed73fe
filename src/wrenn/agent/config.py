"""Host agent settings, read once from ``WRENN_AGENT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WRENN_AGENT_")

    host: str = "127.0.0.1"
    port: int = 5007
    log_level: str = "info"
    #: Root of everything the agent keeps on disk:
    #:   images/     guest images (kernel, initrd, rootfs) cached by input hash
    #:   snapshots/  snapshot store: <build-id>/{memfile, rootfs, state, header}
    #:   disks/      per-sandbox copy-on-write disks
    #:   run/        sockets, serial logs and pid files of running VMs
    state_dir: Path = Path("/var/lib/wrenn")
    #: "auto" probes at start: firecracker where KVM really boots guests, else qemu.
    runtime: Literal["auto", "firecracker", "qemu"] = "auto"
    #: qemu accelerator: "auto" tries KVM with a boot probe and falls back to TCG.
    qemu_accel: Literal["auto", "kvm", "tcg"] = "auto"
    firecracker_bin: str = "firecracker"
    qemu_bin: str = "qemu-system-x86_64"
    #: Network slots pre-created at start and recycled.
    slots: int = 8
    default_vcpus: int = 1
    default_memory_mib: int = 512
