"""The QEMU command line for a microvm guest, built from a ``VmConfig`` (pure, no I/O beyond
reading the host's TSC frequency)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wrenn.agent.vmm.base import VmConfig
from wrenn.core.errors import InvalidArgument

Accel = Literal["kvm", "tcg"]

#: Id of the guest RAM backend; a snapshot restores only into a VM whose RAM has the same id.
RAM_ID = "ram"
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, which a TCG guest sees as its own TSC frequency.

    Without it on the command line (``tsc_early_khz``) the guest calibrates the TSC against
    emulated timers, which under TCG sometimes never finishes."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)
    if flags is None or mhz is None or "constant_tsc" not in flags.group(1).split():
        return None
    return round(float(mhz.group(1)) * 1000)


def kernel_args(config: VmConfig, accel: Accel, tsc_khz: int | None) -> str:
    """The guest kernel command line: the driver's own arguments, then the caller's, then
    ``config.metadata`` as ``wrenn.meta.<key>=<value>``."""
    # A panic reboots at once, and a reboot is a triple fault (microvm has no reset
    # controller the kernel would try first), which -no-reboot turns into QEMU exiting.
    args = ["console=ttyS0", "panic=-1", "reboot=t"]
    if accel == "tcg" and tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    if config.kernel_args:
        args.append(config.kernel_args)
    for key, value in sorted(config.metadata.items()):
        if not _METADATA_KEY.match(key) or not value or any(c.isspace() for c in value):
            raise InvalidArgument(f"metadata {key!r} cannot go on a kernel command line")
        args.append(f"wrenn.meta.{key}={value}")
    return " ".join(args)


@dataclass(frozen=True)
class Launch:
    """How this QEMU process starts: accelerator, where its files go, and whether it waits
    for an incoming snapshot."""

    accel: Accel
    qmp_socket: Path
    console_log: Path
    pid_file: Path
    memory_file: Path
    #: True: guest RAM is the file itself (MAP_SHARED), so a snapshot's memory is that file.
    #: False: the file is mapped copy-on-write (MAP_PRIVATE) and never written.
    share_memory: bool
    incoming: bool = False
    tsc_khz: int | None = None


def argv(qemu_bin: str, config: VmConfig, launch: Launch) -> list[str]:
    mem = f"{config.memory_mib}M"
    share = "on" if launch.share_memory else "off"
    args = [
        qemu_bin,
        "-name",
        f"wrenn-{config.vm_id}",
        "-machine",
        f"microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,memory-backend={RAM_ID}",
        "-accel",
        launch.accel,
        "-cpu",
        "host" if launch.accel == "kvm" else "max",
        "-smp",
        str(config.vcpus),
        "-m",
        mem,
        "-object",
        f"memory-backend-file,id={RAM_ID},size={mem},mem-path={launch.memory_file},share={share}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        f"file,id=console,path={launch.console_log},append=on",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{launch.qmp_socket},server=on,wait=off",
        "-pidfile",
        str(launch.pid_file),
        "-kernel",
        str(config.kernel),
        "-append",
        kernel_args(config, launch.accel, launch.tsc_khz),
        "-drive",
        f"id=root,file={config.rootfs},format=raw,if=none,cache=writeback",
        "-device",
        "virtio-blk-device,drive=root",
    ]
    if config.initrd is not None:
        args += ["-initrd", str(config.initrd)]
    if config.network is not None:
        args += [
            "-netdev",
            f"tap,id=net0,ifname={config.network.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={config.network.mac}",
        ]
    if launch.incoming:
        args += ["-S", "-incoming", "defer"]
    return args
