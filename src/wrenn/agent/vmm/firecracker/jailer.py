"""Running Firecracker under its jailer: the configuration, the argument list, and the chroot
the jailed process sees as ``/``.

    <chroot_base>/<exec file name>/<vm_id>/root/     the chroot (jailer: chown to uid:gid)
        firecracker                                  copied in by the jailer
        firecracker.pid                              written by the jailer
        run/firecracker.socket                       the API socket
        <staged files>                               kernel, rootfs, snapshot files, sockets

Files the VM uses are *staged* into the chroot before Firecracker is told about them: hard
linked, so writes reach the original and nothing is copied. A file Firecracker only reads may
be copied instead when it lives on another filesystem; one it writes (the disk, its log) or a
socket may not, so ``chroot_base`` belongs on the filesystem of the agent's state directory.
Files Firecracker writes are given to uid:gid (a hard link shares the inode: the original
changes owner too); files it only reads keep their owner and must be readable by uid:gid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wrenn.core.errors import InvalidArgument

#: The jailer accepts ids of alphanumerics and hyphens, at most 64 of them.
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
#: Where the API socket is, as Firecracker sees it inside the chroot.
JAILED_API_SOCKET = Path("/run/firecracker.socket")


@dataclass(frozen=True)
class JailerConfig:
    """How to jail each Firecracker process. ``cgroups`` are ``<file>: <value>`` pairs the jailer
    writes (``cpu.max``, ``memory.max`` with version 2); ``resource_limits`` are ``fsize`` and
    ``no-file``. ``new_pid_ns``: the jailer forks Firecracker into a new PID namespace and
    exits; the driver then follows the PID the jailer wrote into the chroot."""

    uid: int
    gid: int
    jailer_bin: str = "jailer"
    chroot_base: Path = Path("/srv/jailer")
    cgroup_version: Literal[1, 2] = 2
    cgroups: Mapping[str, str] = field(default_factory=dict)
    parent_cgroup: str | None = None
    resource_limits: Mapping[str, int] = field(default_factory=dict)
    new_pid_ns: bool = False

    def jail_dir(self, firecracker_bin: Path, vm_id: str) -> Path:
        """The directory the jailer makes for one VM (removed when the VM stops)."""
        return self.chroot_base / firecracker_bin.name / vm_id

    def chroot(self, firecracker_bin: Path, vm_id: str) -> Path:
        return self.jail_dir(firecracker_bin, vm_id) / "root"


def netns_path(netns: str) -> Path:
    """An ``ip netns`` name as the file the namespace is bound to; a path stays as it is."""
    return Path(netns) if netns.startswith("/") else Path("/run/netns") / netns


def check_jail_id(vm_id: str) -> None:
    if not _JAIL_ID.match(vm_id):
        raise InvalidArgument(
            f"vm id {vm_id!r} cannot name a jail: use at most 64 letters, digits and hyphens"
        )


def jailer_argv(
    jailer: JailerConfig,
    *,
    vm_id: str,
    firecracker_bin: Path,
    netns: str | None,
    firecracker_args: Sequence[str],
) -> list[str]:
    """The jailer's command line; ``firecracker_args`` follow ``--`` and use chroot paths."""
    check_jail_id(vm_id)
    if "firecracker" not in firecracker_bin.name:
        raise InvalidArgument(
            f"the jailer only execs a file named like firecracker, not {firecracker_bin.name!r}"
        )
    argv = [
        jailer.jailer_bin,
        "--id",
        vm_id,
        "--exec-file",
        str(firecracker_bin),
        "--uid",
        str(jailer.uid),
        "--gid",
        str(jailer.gid),
        "--chroot-base-dir",
        str(jailer.chroot_base),
        "--cgroup-version",
        str(jailer.cgroup_version),
    ]
    for name, value in jailer.cgroups.items():
        argv += ["--cgroup", f"{name}={value}"]
    if jailer.parent_cgroup is not None:
        argv += ["--parent-cgroup", jailer.parent_cgroup]
    for name, limit in jailer.resource_limits.items():
        argv += ["--resource-limit", f"{name}={limit}"]
    if netns is not None:
        argv += ["--netns", str(netns_path(netns))]
    if jailer.new_pid_ns:
        argv.append("--new-pid-ns")
    return [*argv, "--", *firecracker_args]


class Jail:
    """One VM's chroot: staging files into it and mapping paths between host and jail."""

    def __init__(self, jailer: JailerConfig, firecracker_bin: Path, vm_id: str) -> None:
        check_jail_id(vm_id)
        self.config = jailer
        self.dir = jailer.jail_dir(firecracker_bin, vm_id)
        self.root = jailer.chroot(firecracker_bin, vm_id)
        self.pid_file = self.root / f"{firecracker_bin.name}.pid"

    @property
    def api_socket(self) -> Path:
        return self.host_path(JAILED_API_SOCKET)

    def host_path(self, jailed: Path) -> Path:
        """Where a path Firecracker sees is on the host."""
        return self.root / jailed.relative_to("/")

    def prepare(self) -> None:
        """Create the chroot before the jailer runs, so files can be staged into it first.
        A directory left by an earlier VM of the same id is removed."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.root.mkdir(parents=True)

    def make_dir(self, jailed: Path) -> Path:
        """A directory Firecracker may write into (snapshots); returns its host path."""
        host = self.host_path(jailed)
        host.mkdir(parents=True, exist_ok=True)
        os.chown(host, self.config.uid, self.config.gid)
        return host

    def stage(self, source: Path, name: str, *, writable: bool = False) -> Path:
        """Make ``source`` visible in the chroot as ``/<name>``; returns the jailed path."""
        jailed = Path("/") / name
        target = self.host_path(jailed)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(source, target)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            # A copy of a file Firecracker writes would lose its writes with the jail.
            if writable or source.is_socket():
                raise InvalidArgument(
                    f"{source} must be on the filesystem of {self.root} to be staged "
                    f"(chroot_base and the files a jailed VM writes share one filesystem)"
                ) from err
            shutil.copy2(source, target)
        if writable:
            os.chown(target, self.config.uid, self.config.gid)
        return jailed

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
