"""A held build's record (``<store>/.held/<build-id>/held.json``): the checksums of its held
files, its parent and the host's boot id when it was held (see ``store``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from wrenn.agent.snapshots.manifest import FileRecord
from wrenn.core.errors import Corrupted

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of the host (changes at every start of the kernel)."""
    return BOOT_ID.read_text().strip()


@dataclass(frozen=True)
class HeldBuild:
    """A build whose files are held and whose devices are not stored yet."""

    build_id: UUID
    parent_id: UUID | None
    #: The host's boot id when the build was held.
    boot_id: str
    files: dict[str, FileRecord]

    @property
    def this_boot(self) -> bool:
        """Held since the host last started: its files (and the page cache of anything written
        beside them) are intact."""
        return self.boot_id == boot_id()

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "build_id": str(self.build_id),
                "parent_id": str(self.parent_id) if self.parent_id else None,
                "boot_id": self.boot_id,
                "files": {k: vars(v) for k, v in sorted(self.files.items())},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> HeldBuild:
        try:
            raw: dict[str, Any] = json.loads(text)
            return cls(
                build_id=UUID(raw["build_id"]),
                parent_id=UUID(raw["parent_id"]) if raw["parent_id"] else None,
                boot_id=str(raw["boot_id"]),
                files={k: FileRecord(**v) for k, v in raw["files"].items()},
            )
        except (ValueError, KeyError, TypeError) as err:
            raise Corrupted(f"{source}: unreadable hold record ({err})") from err
