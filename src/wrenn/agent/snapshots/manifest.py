"""A stored build's ``manifest.json``: the sha256 and size of every file, each device's
generation, size and stored bytes, the parent, and the builds its headers read from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from wrenn.core.errors import Corrupted


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class DeviceRecord:
    generation: int
    size_bytes: int
    block_size: int
    #: Bytes of the device this build stores itself (the rest comes from its dependencies).
    stored_bytes: int


@dataclass(frozen=True)
class Manifest:
    build_id: UUID
    parent_id: UUID | None
    created_at: str
    devices: dict[str, DeviceRecord]
    files: dict[str, FileRecord]
    #: Builds (other than this one) that this build's headers read from.
    depends_on: frozenset[UUID] = field(default_factory=frozenset)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "build_id": str(self.build_id),
                "parent_id": str(self.parent_id) if self.parent_id else None,
                "created_at": self.created_at,
                "devices": {k: vars(v) for k, v in sorted(self.devices.items())},
                "files": {k: vars(v) for k, v in sorted(self.files.items())},
                "depends_on": sorted(str(b) for b in self.depends_on),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(text)
            return cls(
                build_id=UUID(raw["build_id"]),
                parent_id=UUID(raw["parent_id"]) if raw["parent_id"] else None,
                created_at=raw["created_at"],
                devices={k: DeviceRecord(**v) for k, v in raw["devices"].items()},
                files={k: FileRecord(**v) for k, v in raw["files"].items()},
                depends_on=frozenset(UUID(b) for b in raw["depends_on"]),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise Corrupted(f"{source}: unreadable manifest ({err})") from err
