"""Which accelerator QEMU should use here, and why.

KVM is chosen only when a guest kernel really boots under it: ``/dev/kvm`` can exist and
open yet fail to run a guest to completion (nested or PVM-backed KVM). The probe boots the
given kernel with no root disk under ``-accel kvm``; a kernel that runs all the way to its
"cannot mount root" panic proves the accelerator, and QEMU exits (``panic=-1`` with
``-no-reboot``). Anything else (no device, QEMU refusing KVM, a hang) selects TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wrenn.agent.vmm.qemu.args import Accel

#: A kernel under KVM reaches the root-mount panic in well under a second; this is generous.
PROBE_TIMEOUT_S = 10.0
#: Lines a kernel prints once it has got as far as looking for its root filesystem.
_BOOTED_MARKERS = ("VFS: Unable to mount root", "Kernel panic", "Run /init", "No working init")


@dataclass(frozen=True)
class AccelProbe:
    accel: Accel
    reason: str


def _kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


async def probe_accel(
    kernel: Path, *, qemu_bin: str = "qemu-system-x86_64", timeout_s: float = PROBE_TIMEOUT_S
) -> AccelProbe:
    """Boot ``kernel`` briefly under KVM and say which accelerator to use and why."""
    if (problem := _kvm_device_problem()) is not None:
        return AccelProbe("tcg", problem)
    with tempfile.TemporaryDirectory(prefix="wrenn-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        command = [
            qemu_bin,
            "-machine",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{console}",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 root=/dev/wrenn-probe-none",
        ]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                output, _ = await proc.communicate()
        except TimeoutError:
            return AccelProbe(
                "tcg", f"a guest kernel under KVM did not boot within {timeout_s:.0f} s"
            )
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        text = console.read_text(errors="replace") if console.exists() else ""
    if any(marker in text for marker in _BOOTED_MARKERS):
        return AccelProbe("kvm", "a guest kernel booted under KVM")
    detail = output.decode(errors="replace").strip().splitlines()
    why = detail[-1] if detail else f"QEMU exited with {proc.returncode} before the kernel ran"
    return AccelProbe("tcg", f"KVM unusable: {why}")
