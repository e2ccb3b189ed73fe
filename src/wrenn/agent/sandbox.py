"""One sandbox as the agent holds it: its record, its state, its lock, and the exit stack that
owns what it acquired.

    starting ──▶ running ──pause──▶ pausing ──▶ paused ──resume──▶ starting ──▶ running
                   │  ▲                             │
                   │  └── snapshot (pausing, back) ─┘
                   └──────────── destroy: stopping (from any state) ──▶ gone

The sandbox's stack holds its disk and, while a VM runs, the undo of that VM (``Instance``);
pausing closes only the instance, destroying closes the stack. Every operation on a sandbox
holds its lock, so they never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

from wrenn.agent.catalog import SandboxRecord
from wrenn.agent.instance import Instance
from wrenn.core.errors import FailedPrecondition


class SandboxState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class SandboxView:
    """What the agent reports about a sandbox."""

    sandbox_id: str
    template_id: str
    state: SandboxState
    vcpus: int
    memory_mib: int
    started_at_ms: int
    envd_version: str
    #: The build a paused sandbox resumes from.
    build_id: UUID | None
    #: The host-reachable address of the guest while a VM runs; empty otherwise.
    address: str


class Sandbox:
    def __init__(self, record: SandboxRecord, state: SandboxState) -> None:
        self.record = record
        self.state = state
        self.lock = asyncio.Lock()
        self.stack = contextlib.AsyncExitStack()
        self.instance: Instance | None = None
        #: The build the running VM was restored from: the parent of its next snapshot.
        self.parent_build: UUID | None = None

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    def require(self, *states: SandboxState) -> None:
        if self.state not in states:
            allowed = " or ".join(s.value for s in states)
            raise FailedPrecondition(
                f"sandbox {self.sandbox_id} is {self.state.value}, not {allowed}"
            )

    def running(self) -> Instance:
        """The running VM; ``FailedPrecondition`` when there is none."""
        self.require(SandboxState.RUNNING)
        assert self.instance is not None
        return self.instance

    async def stop_instance(self) -> None:
        """Stop the VM, if one runs, and give back what it held (the disk stays)."""
        instance, self.instance = self.instance, None
        self.parent_build = None
        if instance is not None:
            await instance.close()

    def view(self) -> SandboxView:
        return SandboxView(
            sandbox_id=self.sandbox_id,
            template_id=self.record.template_id,
            state=self.state,
            vcpus=self.record.vcpus,
            memory_mib=self.record.memory_mib,
            started_at_ms=self.record.started_at_ms,
            envd_version=self.record.envd_version,
            build_id=self.record.build_id if self.state is SandboxState.PAUSED else None,
            address=self.instance.address if self.instance is not None else "",
        )
