"""TEST DOUBLE of a host agent: ``FakeHostAgent`` serves the real HostAgent Connect service
(the generated ASGI app, over a real loopback socket) backed by an in-memory sandbox table
instead of VMs. It stands in for the agent colleagues are building; it checks what a real
agent checks about requests (states, unknown ids) and records every call."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentASGIApplication

ENVD_VERSION = "0.3.0"


@dataclass
class FakeSandbox:
    sandbox_id: str
    template_id: str
    snapshot_id: str | None
    vcpus: int
    memory_mib: int
    env_vars: dict[str, str]
    metadata: dict[str, str]
    envd_access_token: str
    state: pb.SandboxState
    started_at_ms: int
    build_id: str | None = None
    envd_version: str = ENVD_VERSION
    #: (allow_internet_access, allow_out, deny_out) as last set.
    egress: tuple[bool, list[str], list[str]] = (True, [], [])
    #: The "guest" address it reports (``FakeHostAgent.sandbox_address``).
    address: str = "127.0.0.1"

    def info(self) -> pb.SandboxInfo:
        return pb.SandboxInfo(
            sandbox_id=self.sandbox_id,
            template_id=self.template_id,
            state=self.state,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            started_at_ms=self.started_at_ms,
            envd_version=self.envd_version,
            build_id=self.build_id,
            address=self.address,
        )


@dataclass
class FakeHostAgent:
    """In-memory host agent. ``templates`` maps template id → (vcpus, memory MiB)."""

    templates: dict[str, tuple[int, int]] = field(default_factory=lambda: {"base": (2, 512)})
    vcpus: int = 8
    memory_mib: int = 16 * 1024
    disk_mib: int = 100 * 1024
    sandboxes: dict[str, FakeSandbox] = field(default_factory=dict)
    snapshots: dict[str, pb.SnapshotInfo] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    #: RPC name → error raised (once) by the next call of it.
    fail_next: dict[str, ConnectError] = field(default_factory=dict)
    #: Version of envd its sandboxes report.
    envd_version: str = ENVD_VERSION
    #: What GetHostInfo reports as its network: empty, the control plane reaches its
    #: sandboxes through the forwarding path; this process's (``core.network_id``), the
    #: proxy dials their address (``FakeSandbox.address``) itself.
    network_id: str = ""
    #: The address its sandboxes report.
    sandbox_address: str = "127.0.0.1"
    #: Called when a sandbox starts (create or resume), as a real agent runs envd's /init.
    on_start: Callable[[FakeSandbox], Awaitable[None]] | None = None
    #: envd's log entries per sandbox, as a real agent keeps them (``log`` adds one).
    logs: dict[str, list[pb.SandboxLogEntry]] = field(default_factory=dict)

    def log(
        self, sandbox_id: str, message: str, *, level: str = "info", at_ms: int = 0, **fields: str
    ) -> pb.SandboxLogEntry:
        """Record a log line of a sandbox, as envd would write it on the console."""
        at_ms = at_ms or int(time.time() * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000))
        line = json.dumps({**fields, "event": message, "level": level, "timestamp": f"{stamp}Z"})
        entry = pb.SandboxLogEntry(
            timestamp_ms=at_ms, level=level, message=message, fields=fields, line=line
        )
        self.logs.setdefault(sandbox_id, []).append(entry)
        return entry

    def asgi(self) -> Any:
        return HostAgentASGIApplication(self)

    def _enter(self, rpc: str, target: str) -> None:
        self.calls.append((rpc, target))
        err = self.fail_next.pop(rpc, None)
        if err is not None:
            raise err

    def _get(self, sandbox_id: str) -> FakeSandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise ConnectError(Code.NOT_FOUND, f"sandbox {sandbox_id} not found")
        return sandbox

    def running(self) -> list[str]:
        return [s.sandbox_id for s in self.sandboxes.values() if s.state == pb.SandboxState.RUNNING]

    def paused(self) -> list[str]:
        return [s.sandbox_id for s in self.sandboxes.values() if s.state == pb.SandboxState.PAUSED]

    async def create_sandbox(
        self, request: pb.CreateSandboxRequest, ctx: Any
    ) -> pb.CreateSandboxResponse:
        self._enter("CreateSandbox", request.sandbox_id)
        if request.sandbox_id in self.sandboxes:
            raise ConnectError(Code.ALREADY_EXISTS, f"sandbox {request.sandbox_id} exists")
        snapshot_id = request.snapshot_id if request.has_field("snapshot_id") else None
        if snapshot_id is not None and snapshot_id not in self.snapshots:
            raise ConnectError(Code.NOT_FOUND, f"snapshot {snapshot_id} not on this host")
        if snapshot_id is None and request.template_id not in self.templates:
            raise ConnectError(Code.NOT_FOUND, f"template {request.template_id} not on this host")
        sandbox = FakeSandbox(
            sandbox_id=request.sandbox_id,
            template_id=request.template_id,
            snapshot_id=snapshot_id,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            env_vars=dict(request.env_vars),
            metadata=dict(request.metadata),
            envd_access_token=request.envd_access_token,
            state=pb.SandboxState.RUNNING,
            started_at_ms=int(time.time() * 1000),
            envd_version=self.envd_version,
            egress=_egress(request),
            address=self.sandbox_address,
        )
        if self.on_start is not None:
            await self.on_start(sandbox)
        self.sandboxes[sandbox.sandbox_id] = sandbox
        return pb.CreateSandboxResponse(sandbox=sandbox.info())

    async def destroy_sandbox(
        self, request: pb.DestroySandboxRequest, ctx: Any
    ) -> pb.DestroySandboxResponse:
        self._enter("DestroySandbox", request.sandbox_id)
        self._get(request.sandbox_id)
        del self.sandboxes[request.sandbox_id]
        self.logs.pop(request.sandbox_id, None)
        return pb.DestroySandboxResponse()

    async def pause_sandbox(
        self, request: pb.PauseSandboxRequest, ctx: Any
    ) -> pb.PauseSandboxResponse:
        self._enter("PauseSandbox", request.sandbox_id)
        sandbox = self._get(request.sandbox_id)
        if sandbox.state != pb.SandboxState.RUNNING:
            raise ConnectError(Code.FAILED_PRECONDITION, "sandbox is not running")
        sandbox.state = pb.SandboxState.PAUSED
        sandbox.build_id = str(uuid.uuid4())
        return pb.PauseSandboxResponse(build_id=sandbox.build_id)

    async def resume_sandbox(
        self, request: pb.ResumeSandboxRequest, ctx: Any
    ) -> pb.ResumeSandboxResponse:
        self._enter("ResumeSandbox", request.sandbox_id)
        sandbox = self._get(request.sandbox_id)
        if sandbox.state != pb.SandboxState.PAUSED:
            raise ConnectError(Code.FAILED_PRECONDITION, "sandbox is not paused")
        sandbox.state = pb.SandboxState.RUNNING
        sandbox.build_id = None
        sandbox.envd_access_token = request.envd_access_token
        sandbox.egress = _egress(request)
        if self.on_start is not None:
            await self.on_start(sandbox)
        return pb.ResumeSandboxResponse(sandbox=sandbox.info())

    async def update_sandbox_network(
        self, request: pb.UpdateSandboxNetworkRequest, ctx: Any
    ) -> pb.UpdateSandboxNetworkResponse:
        self._enter("UpdateSandboxNetwork", request.sandbox_id)
        sandbox = self._get(request.sandbox_id)
        if sandbox.state != pb.SandboxState.RUNNING:
            raise ConnectError(Code.FAILED_PRECONDITION, "sandbox is not running")
        sandbox.egress = _egress(request)
        return pb.UpdateSandboxNetworkResponse()

    async def create_snapshot(
        self, request: pb.CreateSnapshotRequest, ctx: Any
    ) -> pb.CreateSnapshotResponse:
        self._enter("CreateSnapshot", request.sandbox_id)
        sandbox = self._get(request.sandbox_id)
        if sandbox.state != pb.SandboxState.RUNNING:
            raise ConnectError(Code.FAILED_PRECONDITION, "sandbox is not running")
        info = pb.SnapshotInfo(
            snapshot_id=request.snapshot_id,
            template_id=sandbox.template_id,
            vcpus=sandbox.vcpus,
            memory_mib=sandbox.memory_mib,
            size_bytes=sandbox.memory_mib * 1024 * 1024,
            created_at_ms=int(time.time() * 1000),
        )
        self.snapshots[request.snapshot_id] = info
        return pb.CreateSnapshotResponse(snapshot=info)

    async def delete_snapshot(
        self, request: pb.DeleteSnapshotRequest, ctx: Any
    ) -> pb.DeleteSnapshotResponse:
        self._enter("DeleteSnapshot", request.snapshot_id)
        if self.snapshots.pop(request.snapshot_id, None) is None:
            raise ConnectError(Code.NOT_FOUND, f"snapshot {request.snapshot_id} not found")
        return pb.DeleteSnapshotResponse()

    async def list_sandboxes(
        self, request: pb.ListSandboxesRequest, ctx: Any
    ) -> pb.ListSandboxesResponse:
        self._enter("ListSandboxes", "")
        return pb.ListSandboxesResponse(sandboxes=[s.info() for s in self.sandboxes.values()])

    async def get_sandbox_metrics(
        self, request: pb.GetSandboxMetricsRequest, ctx: Any
    ) -> pb.GetSandboxMetricsResponse:
        self._enter("GetSandboxMetrics", request.sandbox_id)
        sandbox = self._get(request.sandbox_id)
        return pb.GetSandboxMetricsResponse(
            metrics=pb.SandboxMetrics(
                timestamp_ms=int(time.time() * 1000),
                cpu_count=sandbox.vcpus,
                cpu_used_pct=12.5,
                mem_used_bytes=100 * 1024 * 1024,
                mem_total_bytes=sandbox.memory_mib * 1024 * 1024,
                mem_cache_bytes=50 * 1024 * 1024,
                disk_used_bytes=200 * 1024 * 1024,
                disk_total_bytes=1024 * 1024 * 1024,
            )
        )

    async def get_sandbox_logs(
        self, request: pb.GetSandboxLogsRequest, ctx: Any
    ) -> pb.GetSandboxLogsResponse:
        """What a real agent answers: the kept entries from ``start_ms``, oldest first, at
        most ``limit`` (0: all), in any state of the sandbox."""
        self._enter("GetSandboxLogs", request.sandbox_id)
        self._get(request.sandbox_id)
        entries = [
            e for e in self.logs.get(request.sandbox_id, []) if e.timestamp_ms >= request.start_ms
        ]
        if request.limit:
            entries = entries[: request.limit]
        return pb.GetSandboxLogsResponse(entries=entries)

    async def get_host_info(
        self, request: pb.GetHostInfoRequest, ctx: Any
    ) -> pb.GetHostInfoResponse:
        self._enter("GetHostInfo", "")
        return pb.GetHostInfoResponse(
            runtime="fake",
            vcpus=self.vcpus,
            memory_bytes=self.memory_mib * 1024 * 1024,
            disk_bytes=self.disk_mib * 1024 * 1024,
            memory_free_bytes=self.memory_mib * 1024 * 1024,
            disk_free_bytes=self.disk_mib * 1024 * 1024,
            sandboxes=len(self.sandboxes),
            templates=[
                pb.TemplateInfo(template_id=t, build_id=f"build-{t}", vcpus=c, memory_mib=m)
                for t, (c, m) in self.templates.items()
            ],
            snapshots=list(self.snapshots.values()),
            version="fake",
            network_id=self.network_id,
        )

    def heartbeat_body(self) -> dict[str, Any]:
        """What the agent reports to the control plane (POST /v1/hosts/{id}/heartbeat)."""
        return {
            "runtime": "fake",
            "version": "fake",
            "cpuCount": self.vcpus,
            "memoryMB": self.memory_mib,
            "memoryFreeMB": self.memory_mib,
            "diskSizeMB": self.disk_mib,
            "diskFreeMB": self.disk_mib,
            "templates": [
                {
                    "templateID": t,
                    "buildID": f"build-{t}",
                    "cpuCount": c,
                    "memoryMB": m,
                    "diskSizeMB": 2048,
                    "envdVersion": self.envd_version,
                }
                for t, (c, m) in self.templates.items()
            ],
        }


def _egress(
    request: pb.CreateSandboxRequest | pb.ResumeSandboxRequest | pb.UpdateSandboxNetworkRequest,
) -> tuple[bool, list[str], list[str]]:
    return request.allow_internet_access, list(request.allow_out), list(request.deny_out)
