"""Root filesystem images: ext4 made from a directory by ``mkfs.ext4 -d`` (no loop mounts),
sized from what the tree holds plus headroom."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from wrenn.core.errors import Internal

_MIB = 1 << 20
#: Metadata overhead of ext4 (inode tables, journal, bitmaps) over the files' blocks.
_OVERHEAD_FACTOR = 1.15
#: Files smaller than a block still take one; inodes take their own space too.
_BLOCK_BYTES = 4096


def tree_bytes(root: Path) -> int:
    """Bytes the tree under ``root`` takes on a 4 KiB-block filesystem (each hard link once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            blocks = -(-st.st_size // _BLOCK_BYTES)
            total += max(blocks, 1) * _BLOCK_BYTES
    return total


def size_for(root: Path, headroom_mib: int) -> int:
    """Image size in bytes: the tree with ext4 overhead, plus headroom, rounded to a MiB."""
    needed = int(tree_bytes(root) * _OVERHEAD_FACTOR) + headroom_mib * _MIB
    return -(-needed // _MIB) * _MIB


def make(root: Path, image: Path, size_bytes: int, log: Path, *, label: str = "wrenn-root") -> None:
    """Create ``image`` (sparse, ``size_bytes``) holding the tree under ``root``."""
    with image.open("wb") as f:
        f.truncate(size_bytes)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        label,
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        "-d",
        str(root),
        str(image),
    ]
    with log.open("ab") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise Internal(f"mkfs.ext4 failed (exit {proc.returncode}); see {log}")
