"""Reflink copies (FICLONE): the new file shares every extent of the source until either is
written, so a clone costs O(1) in the file's size. Blocking ioctls: call from a worker thread."""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from pathlib import Path

#: _IOW(0x94, 9, int)
FICLONE = 0x40049409

#: What FICLONE answers on a filesystem (or pair of files) that cannot share extents.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}


def clone(src: Path, dst: Path) -> None:
    """Create ``dst`` as a reflink copy of ``src``. ``dst`` must not exist; on failure no
    ``dst`` is left. Raises ``OSError`` (EOPNOTSUPP where the filesystem lacks reflink)."""
    with open(src, "rb") as source:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, source.fileno())
        except BaseException:
            os.close(fd)
            dst.unlink(missing_ok=True)
            raise
        os.close(fd)


def supported(directory: Path) -> bool:
    """Whether files in ``directory`` can be reflink-copied (probed with two scratch files)."""
    probe = directory / f".reflink-probe-{uuid.uuid4().hex}"
    copy = probe.with_name(probe.name + "-copy")
    try:
        probe.write_bytes(b"\0" * 4096)
        clone(probe, copy)
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        probe.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
    return True
