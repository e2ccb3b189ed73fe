"""What a crashed agent leaves of its VMs: VMM processes and their run directories.

Every VM runs in a directory under ``run_root`` where its VMM's pid is recorded (``vmm.pid``)
as soon as the VMM is up. A VMM process is recognised by its command line naming a file under
``run_root`` (QEMU's QMP socket and console, Firecracker's API socket): that also finds a VMM
whose agent died before the pid file was written, and never matches a process that merely
reuses a recorded pid. Blocking: run on a worker thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PID_FILE = "vmm.pid"
_GONE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReapedVms:
    pids: list[int]
    run_dirs: list[str]

    @property
    def empty(self) -> bool:
        return not (self.pids or self.run_dirs)


def write_pid(run_dir: Path, pid: int) -> None:
    (run_dir / PID_FILE).write_text(f"{pid}\n")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie of a reparented VMM is its new parent's to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split(maxsplit=1)[0] != "Z"


def vmm_processes(run_root: Path) -> list[int]:
    """Pids of live processes whose command line names a path under ``run_root``."""
    marker = f"{run_root}/"
    recorded: set[int] = set()
    for pid_file in run_root.rglob(PID_FILE):
        try:
            recorded.add(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    found = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    me = os.getpid()
    return sorted(
        pid
        for pid in set(found) | recorded
        if pid != me and marker in _cmdline(pid) and _alive(pid)
    )


def reap(run_root: Path, vm_root: Path) -> ReapedVms:
    """Kill every VMM left under ``run_root`` and remove the VMs' run directories under
    ``vm_root`` (which is left empty)."""
    pids = vmm_processes(run_root) if run_root.is_dir() else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + _GONE_TIMEOUT_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    vm_root.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for entry in vm_root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        run_dirs.append(entry.name)
    return ReapedVms(pids=pids, run_dirs=sorted(run_dirs))
