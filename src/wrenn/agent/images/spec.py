"""What a guest image is made of (``ImageSpec``) and what a build leaves on disk
(``GuestImage``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: Where wrenn-init lives in the guest and the disk the root filesystem is on.
INIT_PATH = "/usr/sbin/wrenn-init"
ROOT_DEVICE = "/dev/vda"

#: Packages of the base image, as E2B's base image has them: an interpreter, a user with
#: passwordless sudo, and the tools wrenn-init runs (iproute2, kmod, chrony, tini).
BASE_PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-venv",
    "socat",
    "chrony",
    "tini",
    "iproute2",
    "ca-certificates",
    "sudo",
    "kmod",
    "procps",
    "netbase",
    # initramfs-tools compresses the initrd with zstd when it is installed, else gzip.
    "zstd",
)

#: Modules the initrd must carry to find and mount the root disk on a virtio-mmio bus.
INITRD_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "ext4",
    "crc32c_generic",
)


@dataclass(frozen=True)
class ImageSpec:
    """The inputs of a guest image build. Every field is part of the cache key."""

    name: str = "base"
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    packages: tuple[str, ...] = BASE_PACKAGES
    #: CPython minor version of the suite's python3 (the wheelhouse is resolved for it).
    python_version: str = "3.11"
    kernel_package: str = "linux-image-cloud-amd64"
    initrd_modules: tuple[str, ...] = INITRD_MODULES
    #: The unprivileged user envd runs commands as by default.
    user: str = "user"
    #: Free space left in the root filesystem beyond what its files take.
    headroom_mib: int = 1024

    def to_json(self) -> dict[str, object]:
        return asdict(self)


BASE = ImageSpec()


@dataclass(frozen=True)
class GuestImage:
    """A built image: ``<state_dir>/images/<name>-<key>/``."""

    name: str
    key: str
    dir: Path
    kernel_version: str

    @property
    def kernel(self) -> Path:
        """The distro bzImage (what QEMU boots)."""
        return self.dir / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel (what Firecracker boots)."""
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def kernel_args(self) -> str:
        """The kernel arguments this image needs: its root disk and wrenn-init. The guest
        network comes on top (``ip=``, see ``wrenn.agent.network.kernel_ip_arg``)."""
        return f"root={ROOT_DEVICE} rw rootfstype=ext4 init={INIT_PATH} fsck.mode=skip"

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        data = json.loads((directory / "manifest.json").read_text())
        return cls(
            name=data["name"],
            key=data["key"],
            dir=directory,
            kernel_version=data["kernel_version"],
        )
