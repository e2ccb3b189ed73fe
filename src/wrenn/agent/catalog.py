"""What the agent remembers across restarts, one JSON file per record under
``<state_dir>/catalog/``:

    templates/<template_id>.json   a template's snapshot build and what it runs with
    snapshots/<snapshot_id>.json   a named snapshot's build (new sandboxes spawn from it)
    sandboxes/<sandbox_id>.json    a paused sandbox: its disk, the build it resumes from

Running sandboxes are not recorded: their VMs do not outlive the agent, and whatever a crashed
agent left of them is reaped at start. Records hold envd access tokens, so files are 0600.

A paused sandbox's build may still be being stored when its record is written: the snapshot
store then *holds* it (``SnapshotStore.held``; its state held, its memory kept as the build's
memory image). The store, not the record, says which: at start the agent redoes the store of a
held build a record names (same boot of the host) or drops the record (see ``pending``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from wrenn import log

_log = log.get(__name__)


class TemplateRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    template_id: str
    build_id: UUID
    vcpus: int
    memory_mib: int
    #: ``RuntimeChoice.label`` of the runtime that took the snapshot.
    runtime: str
    #: The guest image the template was booted from (a restore starts the same kernel).
    image_key: str
    image_dir: str
    envd_version: str
    disk_size_bytes: int
    created_at_ms: int


class SnapshotRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    snapshot_id: str
    build_id: UUID
    template_id: str
    vcpus: int
    memory_mib: int
    runtime: str
    image_dir: str
    envd_version: str
    #: The token envd in the snapshot's memory requires (the source sandbox's).
    envd_access_token: str
    disk_size_bytes: int
    size_bytes: int
    created_at_ms: int


class SandboxRecord(BaseModel):
    """A sandbox as created; recorded while it is paused."""

    sandbox_id: str
    template_id: str
    snapshot_id: str | None = None
    vcpus: int
    memory_mib: int
    runtime: str
    image_dir: str
    envd_version: str
    #: The token envd in the guest requires (the agent sends it on its own calls).
    envd_access_token: str = ""
    env_vars: dict[str, str] = {}
    metadata: dict[str, str] = {}
    default_user: str | None = None
    default_workdir: str | None = None
    allow_internet_access: bool = False
    #: Destinations always / never reachable from the guest (IPv4 CIDR blocks).
    allow_out: list[str] = []
    deny_out: list[str] = []
    started_at_ms: int
    disk_id: str
    #: The build a paused sandbox resumes from.
    build_id: UUID | None = None


R = TypeVar("R", bound=BaseModel)


class Table(Generic[R]):
    """Records of one kind, all held in memory and each written through to its file."""

    def __init__(self, directory: Path, model: type[R], key: str) -> None:
        self.directory = directory
        self._model = model
        self._key = key
        self._records: dict[str, R] = {}

    def load(self) -> None:
        """Read every record (blocking). Unreadable files are logged and left alone."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink()
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = self._model.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as err:
                _log.warning("catalog.unreadable", path=str(path), error=str(err))
                continue
            self._records[str(getattr(record, self._key))] = record

    def get(self, record_id: str) -> R | None:
        return self._records.get(record_id)

    def all(self) -> list[R]:
        return list(self._records.values())

    async def put(self, record: R) -> None:
        record_id = str(getattr(record, self._key))
        await asyncio.to_thread(self._write, record_id, record.model_dump_json(indent=2).encode())
        self._records[record_id] = record

    async def delete(self, record_id: str) -> None:
        self._records.pop(record_id, None)
        await asyncio.to_thread(self._path(record_id).unlink, missing_ok=True)

    def _path(self, record_id: str) -> Path:
        return self.directory / f"{record_id}.json"

    def _write(self, record_id: str, data: bytes) -> None:
        tmp = self.directory / f".{record_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self._path(record_id))


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.templates = Table(root / "templates", TemplateRecord, "template_id")
        self.snapshots = Table(root / "snapshots", SnapshotRecord, "snapshot_id")
        self.sandboxes = Table(root / "sandboxes", SandboxRecord, "sandbox_id")

    async def load(self) -> None:
        for table in (self.templates, self.snapshots, self.sandboxes):
            await asyncio.to_thread(table.load)
