"""``firecracker_usable()``: the facts the agent's runtime chooser needs about Firecracker on
this host — is there a KVM device we can open, and does the binary run and say its version.

It does not boot a guest. A host can pass this probe and still fail to boot one (a nested or
paravirtualised KVM that cannot run a guest kernel to the end); whether guests really boot is
a separate, slower probe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
#: The release whose API request bodies this driver speaks.
SUPPORTED_VERSION = "1.12"
_VERSION = re.compile(r"Firecracker v(\d+\.\d+\.\d+)")
_VERSION_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class FirecrackerProbe:
    #: KVM can be opened and the binary ran.
    usable: bool
    kvm: bool
    #: The binary's resolved path, when found.
    binary: Path | None
    #: e.g. "1.12.1", when the binary answered ``--version``.
    version: str | None
    #: Why it is not usable, or notes about a usable one (empty when there is nothing to say).
    reason: str

    @property
    def version_supported(self) -> bool:
        return self.version is not None and (
            self.version == SUPPORTED_VERSION or self.version.startswith(SUPPORTED_VERSION + ".")
        )


def _kvm_openable(device: Path) -> tuple[bool, str]:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{device} does not exist (no KVM on this host)"
    except OSError as err:
        return False, f"{device} cannot be opened: {err.strerror}"
    os.close(fd)
    return True, ""


async def _version(binary: Path) -> tuple[str | None, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as err:
        return None, f"{binary} does not run: {err.strerror}"
    try:
        async with asyncio.timeout(_VERSION_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, f"{binary} --version did not answer in {_VERSION_TIMEOUT_S:g} s"
    text = out.decode(errors="replace")
    match = _VERSION.search(text)
    if proc.returncode != 0 or match is None:
        first = text.strip().splitlines()[:1]
        return None, f"{binary} --version failed (exit {proc.returncode}): {' '.join(first)}"
    return match.group(1), ""


def _resolve(firecracker_bin: str) -> Path | None:
    found = shutil.which(firecracker_bin)
    return Path(found).resolve() if found is not None else None


async def firecracker_usable(
    firecracker_bin: str = "firecracker", *, kvm_device: Path = KVM_DEVICE
) -> FirecrackerProbe:
    """Whether KVM is there and ``firecracker_bin`` (a path or a name on PATH) runs."""
    kvm, kvm_reason = _kvm_openable(kvm_device)
    binary = _resolve(firecracker_bin)
    if binary is None:
        reasons = [r for r in (kvm_reason, f"firecracker binary not found: {firecracker_bin}") if r]
        return FirecrackerProbe(False, kvm, None, None, "; ".join(reasons))
    version, run_reason = await _version(binary)
    reasons = [r for r in (kvm_reason, run_reason) if r]
    probe = FirecrackerProbe(kvm and version is not None, kvm, binary, version, "")
    if probe.usable and not probe.version_supported:
        reasons.append(f"version {version} is not the {SUPPORTED_VERSION} this driver speaks")
    return dataclasses.replace(probe, reason="; ".join(reasons))
