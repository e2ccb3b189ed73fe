"""Guest images: a Debian root filesystem with envd and wrenn-init, the distro's cloud kernel
and initrd, built by ``build_base`` and cached by the hash of their inputs."""

from wrenn.agent.images.build import build_base, image_dir
from wrenn.agent.images.spec import BASE, GuestImage, ImageSpec

__all__ = ["BASE", "GuestImage", "ImageSpec", "build_base", "image_dir"]
