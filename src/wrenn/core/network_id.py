"""Which network a process sees: the machine's boot and the process's network namespace. Two
processes showing the same id share routes and addresses, so one reaches whatever the other
can (a control plane on its host agent's machine reaches the agent's sandbox addresses)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def network_id() -> str:
    """``{boot id}/{namespace device}:{namespace inode}``; empty where the kernel does not
    tell (then it matches nothing)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    return f"{boot}/{ns.st_dev}:{ns.st_ino}"
