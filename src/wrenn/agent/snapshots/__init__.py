"""Snapshot builds: per-device headers mapping every block to the build that holds it, diffs
that store only changed blocks, and the store that keeps builds with checksums and refuses
to drop a layer another build still reads. Format and layout: docs/snapshots.md."""

from wrenn.agent.snapshots.diff import (
    DiffResult,
    blocks_from_bitmap,
    dirty_blocks_from_sparse,
    find_dirty_blocks,
    write_diff,
)
from wrenn.agent.snapshots.header import NIL_BUILD_ID, Header, Mapping
from wrenn.agent.snapshots.held import HeldBuild
from wrenn.agent.snapshots.manifest import DeviceRecord, FileRecord, Manifest
from wrenn.agent.snapshots.reader import Extent, Reader
from wrenn.agent.snapshots.store import DeviceInput, LocalSnapshotStore, SnapshotStore

__all__ = [
    "NIL_BUILD_ID",
    "DeviceInput",
    "DeviceRecord",
    "DiffResult",
    "Extent",
    "FileRecord",
    "Header",
    "HeldBuild",
    "LocalSnapshotStore",
    "Manifest",
    "Mapping",
    "Reader",
    "SnapshotStore",
    "blocks_from_bitmap",
    "dirty_blocks_from_sparse",
    "find_dirty_blocks",
    "write_diff",
]
