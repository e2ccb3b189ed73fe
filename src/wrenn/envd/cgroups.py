"""The cgroup user processes run in, so that envd stays responsive when user code exhausts
memory or CPU.

envd creates one group, ``wrenn-user-<envd pid>``, under its *own* cgroup (envd itself stays
outside it) in every hierarchy that has a controller worth using:

* **cgroup v2** when the unified hierarchy offers the ``memory`` controller: one group with
  ``memory.max`` and ``cpu.weight`` (cpu/pids enabled when offered). Enabling controllers for
  children needs envd's cgroup to hold no processes unless it is the root (as in a sandbox,
  where envd runs in ``/``); otherwise v2 is reported unusable.
* **cgroup v1** otherwise (also on hybrid hosts whose v2 mount has no controllers): a group in
  the ``memory`` hierarchy with ``memory.limit_in_bytes``, plus ``cpu`` (``cpu.shares``) and
  ``pids`` groups when those hierarchies are mounted.

The memory limit is envd's effective limit (the machine's memory, or a lower limit of an
enclosing cgroup) minus headroom for envd: an eighth, at least 96 MiB and at most 512 MiB,
never leaving user code less than half. When user code exceeds it the kernel's OOM killer
runs inside the group, so it kills user code and never envd. User processes also get a raised
``oom_score_adj`` (see ``process.spawn``) for machine-wide shortages.

A child is in the group before its program starts, so not even its first fork escapes: held at
the spawn gate, envd writes its pid to ``cgroup.procs`` through descriptors opened here
(:meth:`Cgroups.child_fds`); a forked child writes ``0`` to them itself between fork and exec
(see ``process.spawn``).
:meth:`Cgroups.remove` kills whatever is left in the group and removes it; groups left by a
previous envd that died are removed at setup when empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wrenn import log
from wrenn.envd.config import EnvdSettings

_log = log.get(__name__)

GROUP_PREFIX = "wrenn-user-"
V1_CONTROLLERS = ("memory", "cpu", "pids")
MIN_HEADROOM_BYTES = 96 << 20
MAX_HEADROOM_BYTES = 512 << 20
#: Limits at or above this are "unlimited" (v1 reports PAGE_COUNTER_MAX pages in bytes).
UNLIMITED_BYTES = 1 << 62
#: CPU weight of user code relative to envd (v2 ``cpu.weight`` default 100, v1 shares 1024).
USER_CPU_WEIGHT = 50
USER_CPU_SHARES = 512
REMOVE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One mounted hierarchy and envd's own cgroup directory in it."""

    controllers: frozenset[str]
    own: Path


@dataclass(frozen=True, slots=True)
class Layout:
    version: Literal[1, 2]
    hierarchies: tuple[Hierarchy, ...]


@dataclass(frozen=True, slots=True)
class _Mount:
    fstype: str
    mountpoint: str
    root: str
    super_options: frozenset[str]


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            _Mount(
                fstype=tail[0],
                mountpoint=_unescape(fields[4]),
                root=_unescape(fields[3]),
                super_options=frozenset(tail[2].split(",")),
            )
        )
    return mounts


def _own_paths(proc_cgroup: str) -> tuple[str | None, dict[str, str]]:
    """envd's v2 path and its v1 path per controller, from ``/proc/self/cgroup``."""
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            unified = path
        else:
            for name in controllers.split(","):
                v1[name] = path
    return unified, v1


def _directory(mount: _Mount, path: str) -> Path | None:
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    rel = path[len(root) :].lstrip("/")
    return Path(mount.mountpoint) / rel


def _under(mountpoint: str, cgroup_root: str) -> bool:
    root = cgroup_root.rstrip("/") or "/"
    return mountpoint == root or mountpoint.startswith(root.rstrip("/") + "/")


def detect(cgroup_root: str, proc: Path = Path("/proc/self")) -> Layout | str:
    """Which cgroup layout user processes can use, or why none is usable."""
    try:
        mounts = [
            m
            for m in _mounts((proc / "mountinfo").read_text())
            if _under(m.mountpoint, cgroup_root)
        ]
        unified, v1_paths = _own_paths((proc / "cgroup").read_text())
    except OSError as err:
        return f"cannot read cgroup membership: {err.strerror}"
    reasons: list[str] = []
    for mount in mounts:
        if mount.fstype != "cgroup2" or unified is None:
            continue
        own = _directory(mount, unified)
        if own is None:
            continue
        try:
            offered = frozenset((own / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if "memory" in offered:
            return Layout(2, (Hierarchy(offered & {"memory", "cpu", "pids"}, own),))
        reasons.append(f"cgroup v2 at {mount.mountpoint} offers no memory controller")
    found: dict[str, Hierarchy] = {}
    for name in V1_CONTROLLERS:
        for mount in mounts:
            if mount.fstype != "cgroup" or name not in mount.super_options:
                continue
            path = v1_paths.get(name)
            own = _directory(mount, path) if path is not None else None
            if own is not None and own.is_dir():
                found[name] = Hierarchy(frozenset({name}), own)
                break
    if "memory" in found:
        return Layout(1, tuple(found[n] for n in V1_CONTROLLERS if n in found))
    reasons.append("no cgroup v1 memory hierarchy mounted")
    return "; ".join(reasons)


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < UNLIMITED_BYTES else None


def _machine_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, "MemTotal missing from /proc/meminfo")


def effective_memory_bytes(layout: Layout) -> int:
    """The memory envd's cgroup may use: the machine's, or an enclosing group's lower limit."""
    limit = _machine_memory_bytes()
    memory = next(h for h in layout.hierarchies if "memory" in h.controllers)
    name = "memory.max" if layout.version == 2 else "memory.limit_in_bytes"
    directory = memory.own
    while True:
        value = _read_limit(directory / name)
        if value is not None:
            limit = min(limit, value)
        if directory.parent == directory or not (directory.parent / "cgroup.procs").exists():
            return limit
        directory = directory.parent


def user_memory_limit_bytes(effective_bytes: int) -> int:
    headroom = min(max(effective_bytes // 8, MIN_HEADROOM_BYTES), MAX_HEADROOM_BYTES)
    return max(effective_bytes - headroom, effective_bytes // 2)


def _remove_stale(own: Path) -> None:
    """Remove empty groups of envd processes that are gone."""
    try:
        entries = list(own.iterdir())
    except OSError:
        return
    for entry in entries:
        suffix = entry.name.removeprefix(GROUP_PREFIX)
        if suffix == entry.name or not suffix.isdigit() or int(suffix) == os.getpid():
            continue
        if Path(f"/proc/{suffix}").exists():
            continue
        try:
            entry.rmdir()
            _log.info("cgroups.stale_removed", path=str(entry))
        except OSError:
            pass


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _enable_v2(hierarchy: Hierarchy) -> frozenset[str]:
    """Enable the controllers for envd's child groups; memory is required, cpu and pids
    are used when they can be enabled."""
    enabled = set()
    for name in sorted(hierarchy.controllers, key=lambda c: c != "memory"):
        try:
            _write(hierarchy.own / "cgroup.subtree_control", f"+{name}")
        except OSError:
            if name == "memory":
                raise
            continue
        enabled.add(name)
    return frozenset(enabled)


@dataclass
class Cgroups:
    """The user-process group(s) of one envd."""

    version: Literal[1, 2]
    groups: list[Path]
    memory_limit_bytes: int
    _fds: list[int] = field(default_factory=list)

    @classmethod
    def setup(
        cls,
        settings: EnvdSettings,
        *,
        name: str | None = None,
        memory_limit_bytes: int | None = None,
    ) -> Cgroups | None:
        """Create the user group, or return None (logging why) when no usable controller
        exists or the groups cannot be made."""
        layout = detect(settings.cgroup_root)
        if isinstance(layout, str):
            _log.warning("cgroups.unavailable", reason=layout)
            return None
        name = name or f"{GROUP_PREFIX}{os.getpid()}"
        made = cls(version=layout.version, groups=[], memory_limit_bytes=0)
        try:
            limit = memory_limit_bytes or user_memory_limit_bytes(effective_memory_bytes(layout))
            made.memory_limit_bytes = limit
            for hierarchy in layout.hierarchies:
                _remove_stale(hierarchy.own)
                controllers = hierarchy.controllers
                if layout.version == 2:
                    controllers = _enable_v2(hierarchy)
                group = hierarchy.own / name
                group.mkdir(exist_ok=True)
                made.groups.append(group)
                made._configure(group, controllers, limit)
                made._fds.append(os.open(group / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError as err:
            _log.warning(
                "cgroups.setup_failed", error=err.strerror, path=err.filename, exc_info=err
            )
            made.remove()
            return None
        _log.info(
            "cgroups.ready",
            version=layout.version,
            groups=[str(g) for g in made.groups],
            memory_limit_bytes=limit,
        )
        return made

    def _configure(self, group: Path, controllers: frozenset[str], limit: int) -> None:
        if self.version == 2:
            if "memory" in controllers:
                _write(group / "memory.max", str(limit))
            if "cpu" in controllers:
                _write(group / "cpu.weight", str(USER_CPU_WEIGHT))
        else:
            if "memory" in controllers:
                _write(group / "memory.limit_in_bytes", str(limit))
            if "cpu" in controllers:
                _write(group / "cpu.shares", str(USER_CPU_SHARES))

    def child_fds(self) -> tuple[int, ...]:
        """Descriptors of the groups' ``cgroup.procs``: envd writes a child's pid to each, or
        a forked child writes ``0`` (allowed after it dropped privileges, since they were
        opened by root)."""
        return tuple(self._fds)

    def place(self, pid: int) -> None:
        """Move the process ``pid`` into the user group(s)."""
        for group in self.groups:
            _write(group / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for group in self.groups:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (group / "cgroup.procs").read_text().split())
        return found

    def remove(self) -> None:
        """Kill what is left in the group(s) and remove them (blocking, bounded)."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        for group in reversed(self.groups):
            while True:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        _log.warning("cgroups.remove_failed", path=str(group), error=err.strerror)
                        break
                    time.sleep(0.02)
        self.groups.clear()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.remove)
