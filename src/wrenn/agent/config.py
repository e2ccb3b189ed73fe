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
    #: Names of everything the slot pool creates on the host (namespaces ``<prefix>-slot-<i>``,
    #: veths ``<prefix>-v<i>``); the reaper removes whatever is named under it at start.
    network_prefix: str = "wrenn"
    #: Split into a /30 per slot (host veth, namespace veth).
    transit_pool: str = "10.12.0.0/16"
    #: One host-reachable "sandbox address" per slot, NATed to the guest.
    sandbox_pool: str = "10.11.0.0/16"
    default_vcpus: int = 1
    default_memory_mib: int = 512
    #: A built guest image directory to use as is; unset: find or build the base image under
    #: ``<state_dir>/images`` at start.
    base_image_dir: Path | None = None
    #: Build the base template's snapshot in the background at start (else on first use).
    warm_base_template: bool = True
    #: Cold boot to envd answering /health (template builds; TCG boots take seconds).
    boot_timeout_s: float = 180.0
    #: Snapshot restore to envd answering /health (create, resume).
    restore_timeout_s: float = 60.0
    #: The control plane to register with and heartbeat to (``registration.py``); empty: none.
    control_plane_url: str = ""
    #: One-time token (``wrenn-cp create-host-token``) for the first registration; the host id
    #: and secret it yields are kept in ``<state_dir>/controlplane.json``.
    registration_token: str = ""
    #: Base URL the control plane reaches this agent at; empty: ``http://{host}:{port}``.
    advertise_url: str = ""
    heartbeat_interval_s: float = 10.0
    #: Move long response bodies (4 MiB and more) on the forwarding path from a socket whose
    #: peer is on this machine to the client's in the kernel (a BPF sockmap redirect,
    #: ``core/http1/sockmap``) instead of through this process; copied where the kernel
    #: cannot. A guest is not on this machine: its bodies are spliced in batches
    #: (``core/http1/wire.BATCH_S``).
    redirect_in_kernel: bool = True
