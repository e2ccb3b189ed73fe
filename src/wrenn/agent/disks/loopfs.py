"""An XFS filesystem (reflink on) kept in a sparse file and loop-mounted, for hosts whose
own filesystem cannot share extents (ext4). Blocking: call from a worker thread.

The backing file is formatted once and reused across agent restarts: per-sandbox disks of
paused sandboxes live in it. ``mount -o loop`` sets the loop device to detach itself when the
filesystem is unmounted; ``discard`` returns the space of deleted files to the host.

The loop device reads ahead nothing (``READ_AHEAD_KB``). QEMU maps a guest's memory image from
this filesystem, and a page fault on a file mapping reads around the faulting page as far as
the device's readahead allows (2.5 MiB by default for a loop device), in large folios that the
fault then maps whole: a restored guest answering one request had ~40 MiB of its image mapped
and ~135 MiB of it cached, against ~8 MiB of each without readahead. Disk images lose nothing
they need: the guest's kernel reads ahead on its own disk, and the host's filesystem reads
ahead in the backing file below the loop device."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wrenn.core.errors import FailedPrecondition, Internal

MOUNT_OPTIONS = "loop,discard,nosuid,nodev,noexec"
READ_AHEAD_KB = 0
_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Mount:
    source: str
    fstype: str


def _run(argv: Sequence[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise FailedPrecondition(f"{argv[0]} not found; install xfsprogs and mount")
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Internal(f"{argv[0]} failed to run") from err
    if done.returncode != 0:
        raise Internal(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_at(mountpoint: Path) -> Mount | None:
    """The filesystem mounted exactly at ``mountpoint`` (the topmost), if any."""
    target = os.path.realpath(mountpoint)
    found: Mount | None = None
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == target:
                found = Mount(source=_unescape(fields[sep + 2]), fstype=fields[sep + 1])
    return found


def loop_backing_file(device: str) -> Path | None:
    """The file behind loop device ``device`` (``/dev/loopN``), if it is one."""
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return Path(text.removesuffix(" (deleted)"))


def loops_of(backing_file: Path) -> list[str]:
    """Loop devices currently attached to ``backing_file``."""
    target = Path(os.path.realpath(backing_file))
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        device = f"/dev/{entry.name}"
        if loop_backing_file(device) == target:
            found.append(device)
    return found


def is_mounted_from(mountpoint: Path, backing_file: Path) -> bool:
    mounted = mount_at(mountpoint)
    if mounted is None:
        return False
    return loop_backing_file(mounted.source) == Path(os.path.realpath(backing_file))


def create(backing_file: Path, size_bytes: int) -> None:
    """Format a new sparse ``backing_file`` of ``size_bytes`` as XFS with reflink."""
    tmp = backing_file.with_name(backing_file.name + ".new")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size_bytes)
    try:
        _run(["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "wrenn-disks", str(tmp)])
        os.replace(tmp, backing_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mount(backing_file: Path, mountpoint: Path) -> None:
    _run(["mount", "-t", "xfs", "-o", MOUNT_OPTIONS, str(backing_file), str(mountpoint)])
    for device in loops_of(backing_file):
        set_read_ahead(device, READ_AHEAD_KB)


def set_read_ahead(device: str, kb: int) -> None:
    """Set how far block device ``device`` (``/dev/loopN``) reads ahead."""
    name = os.path.basename(device)
    try:
        Path(f"/sys/block/{name}/queue/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as err:
        raise Internal(f"cannot set the readahead of {device}: {err}") from err


def read_ahead_kb(device: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(device)}/queue/read_ahead_kb").read_text())


def unmount(mountpoint: Path, backing_file: Path) -> None:
    """Unmount and make sure no loop device stays attached to ``backing_file``."""
    if is_mounted_from(mountpoint, backing_file):
        _run(["umount", str(mountpoint)])
    for device in loops_of(backing_file):
        try:
            _run(["losetup", "-d", device])
        except Internal:
            # The device may have detached itself (autoclear) in the meantime.
            if device in loops_of(backing_file):
                raise
