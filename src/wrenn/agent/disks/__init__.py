"""Copy-on-write disks for sandboxes: reflink copies of template rootfs images in a store on
XFS (a loop-mounted XFS file where the host's filesystem has no reflink)."""

from wrenn.agent.disks.store import DEFAULT_BACKING_SIZE_BYTES, DiskStore, DiskUsage, StoreStats

__all__ = ["DEFAULT_BACKING_SIZE_BYTES", "DiskStore", "DiskUsage", "StoreStats"]
