"""The cache key of an image: a hash over everything that decides its contents."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources

from wrenn.agent.images.spec import ImageSpec

#: Bump when the build procedure changes in a way the scripts and spec do not show.
BUILDER_VERSION = 1

#: Files of ``guest/`` copied into the rootfs; their bytes are part of the key.
GUEST_FILES: tuple[str, ...] = ("provision.sh", "wrenn-init", "chrony.conf")


def guest_file(name: str) -> bytes:
    return resources.files("wrenn.agent.images").joinpath("guest", name).read_bytes()


@dataclass(frozen=True)
class BuildInputs:
    """Everything hashed into an image's key; kept in the image's manifest."""

    spec: ImageSpec
    wheel_digest: str
    builder_version: int = BUILDER_VERSION
    script_digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def collect(cls, spec: ImageSpec, wheel_digest: str) -> BuildInputs:
        digests = {name: hashlib.sha256(guest_file(name)).hexdigest() for name in GUEST_FILES}
        return cls(spec=spec, wheel_digest=wheel_digest, script_digests=digests)

    def to_json(self) -> dict[str, object]:
        return {
            "spec": self.spec.to_json(),
            "wheel_digest": self.wheel_digest,
            "builder_version": self.builder_version,
            "script_digests": self.script_digests,
        }

    @property
    def key(self) -> str:
        """16 hex digits of a SHA-256 over the canonical JSON of the inputs."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
