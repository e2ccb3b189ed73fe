"""The agent's ASGI application: the HostAgent Connect service (proto/hostagent), the
forwarding path under ``/sandboxes/``, and ``GET /health``. Thin: messages are translated to
the manager's calls and back; errors are mapped once, by ``edge``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wrenn.agent import forward, registration
from wrenn.agent.catalog import SnapshotRecord
from wrenn.agent.config import AgentSettings
from wrenn.agent.edge import ErrorInterceptor
from wrenn.agent.manager import CreateParams, Manager
from wrenn.agent.network import Egress
from wrenn.agent.sandbox import SandboxState, SandboxView
from wrenn.core import http1
from wrenn.core.network_id import network_id
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgent, HostAgentASGIApplication

_STATES = {
    SandboxState.STARTING: pb.SandboxState.STARTING,
    SandboxState.RUNNING: pb.SandboxState.RUNNING,
    SandboxState.PAUSING: pb.SandboxState.PAUSING,
    SandboxState.PAUSED: pb.SandboxState.PAUSED,
    SandboxState.STOPPING: pb.SandboxState.STOPPING,
    SandboxState.FAILED: pb.SandboxState.FAILED,
}


def _sandbox(view: SandboxView) -> pb.SandboxInfo:
    return pb.SandboxInfo(
        sandbox_id=view.sandbox_id,
        template_id=view.template_id,
        state=_STATES[view.state],
        vcpus=view.vcpus,
        memory_mib=view.memory_mib,
        started_at_ms=view.started_at_ms,
        envd_version=view.envd_version,
        build_id=str(view.build_id) if view.build_id else None,
        address=view.address,
    )


def _snapshot(record: SnapshotRecord) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        snapshot_id=record.snapshot_id,
        template_id=record.template_id,
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        size_bytes=record.size_bytes,
        created_at_ms=record.created_at_ms,
    )


def _egress(
    request: pb.CreateSandboxRequest | pb.ResumeSandboxRequest | pb.UpdateSandboxNetworkRequest,
) -> Egress:
    return Egress.parse(
        internet=request.allow_internet_access, allow=request.allow_out, deny=request.deny_out
    )


class HostAgentService(HostAgent):
    """Implements the generated ``HostAgent`` protocol on a ``Manager``."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    async def create_sandbox(
        self, request: pb.CreateSandboxRequest, ctx: Any, /
    ) -> pb.CreateSandboxResponse:
        view = await self._manager.create(
            CreateParams(
                sandbox_id=request.sandbox_id,
                template_id=request.template_id,
                snapshot_id=request.snapshot_id or None,
                vcpus=request.vcpus,
                memory_mib=request.memory_mib,
                env_vars=dict(request.env_vars),
                envd_access_token=request.envd_access_token,
                egress=_egress(request),
                metadata=dict(request.metadata),
                default_user=request.default_user or None,
                default_workdir=request.default_workdir or None,
            )
        )
        return pb.CreateSandboxResponse(sandbox=_sandbox(view))

    async def destroy_sandbox(
        self, request: pb.DestroySandboxRequest, ctx: Any, /
    ) -> pb.DestroySandboxResponse:
        await self._manager.destroy(request.sandbox_id)
        return pb.DestroySandboxResponse()

    async def pause_sandbox(
        self, request: pb.PauseSandboxRequest, ctx: Any, /
    ) -> pb.PauseSandboxResponse:
        build_id = await self._manager.pause(request.sandbox_id)
        return pb.PauseSandboxResponse(build_id=str(build_id))

    async def resume_sandbox(
        self, request: pb.ResumeSandboxRequest, ctx: Any, /
    ) -> pb.ResumeSandboxResponse:
        view = await self._manager.resume(
            request.sandbox_id,
            envd_access_token=request.envd_access_token,
            egress=_egress(request),
        )
        return pb.ResumeSandboxResponse(sandbox=_sandbox(view))

    async def update_sandbox_network(
        self, request: pb.UpdateSandboxNetworkRequest, ctx: Any, /
    ) -> pb.UpdateSandboxNetworkResponse:
        await self._manager.update_network(request.sandbox_id, _egress(request))
        return pb.UpdateSandboxNetworkResponse()

    async def create_snapshot(
        self, request: pb.CreateSnapshotRequest, ctx: Any, /
    ) -> pb.CreateSnapshotResponse:
        record = await self._manager.create_snapshot(request.sandbox_id, request.snapshot_id)
        return pb.CreateSnapshotResponse(snapshot=_snapshot(record))

    async def delete_snapshot(
        self, request: pb.DeleteSnapshotRequest, ctx: Any, /
    ) -> pb.DeleteSnapshotResponse:
        await self._manager.delete_snapshot(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    async def list_sandboxes(
        self, request: pb.ListSandboxesRequest, ctx: Any, /
    ) -> pb.ListSandboxesResponse:
        return pb.ListSandboxesResponse(sandboxes=[_sandbox(v) for v in self._manager.list()])

    async def get_sandbox_metrics(
        self, request: pb.GetSandboxMetricsRequest, ctx: Any, /
    ) -> pb.GetSandboxMetricsResponse:
        m = await self._manager.metrics(request.sandbox_id)
        return pb.GetSandboxMetricsResponse(
            metrics=pb.SandboxMetrics(
                timestamp_ms=m.timestamp_ms,
                cpu_count=m.cpu_count,
                cpu_used_pct=m.cpu_used_pct,
                mem_used_bytes=m.mem_used_bytes,
                mem_total_bytes=m.mem_total_bytes,
                mem_cache_bytes=m.mem_cache_bytes,
                disk_used_bytes=m.disk_used_bytes,
                disk_total_bytes=m.disk_total_bytes,
                vmm_rss_bytes=m.vmm_rss_bytes,
                vmm_cpu_seconds=m.vmm_cpu_seconds,
            )
        )

    async def get_sandbox_logs(
        self, request: pb.GetSandboxLogsRequest, ctx: Any, /
    ) -> pb.GetSandboxLogsResponse:
        entries = await self._manager.logs(
            request.sandbox_id, max(0, request.start_ms), request.limit
        )
        return pb.GetSandboxLogsResponse(
            entries=[
                pb.SandboxLogEntry(
                    timestamp_ms=e.timestamp_ms,
                    level=e.level,
                    message=e.message,
                    fields=e.fields,
                    line=e.line,
                )
                for e in entries
            ]
        )

    async def get_host_info(
        self, request: pb.GetHostInfoRequest, ctx: Any, /
    ) -> pb.GetHostInfoResponse:
        info = await self._manager.host_info()
        return pb.GetHostInfoResponse(
            runtime=info.runtime,
            runtime_reason=info.runtime_reason,
            network_id=network_id(),
            vcpus=info.vcpus,
            memory_bytes=info.memory_bytes,
            memory_free_bytes=info.memory_free_bytes,
            disk_bytes=info.disk_bytes,
            disk_free_bytes=info.disk_free_bytes,
            sandboxes=info.sandboxes,
            templates=[
                pb.TemplateInfo(
                    template_id=t.template_id,
                    build_id=str(t.build_id),
                    vcpus=t.vcpus,
                    memory_mib=t.memory_mib,
                    size_bytes=t.disk_size_bytes,
                    envd_version=t.envd_version,
                )
                for t in info.templates
            ],
            snapshots=[_snapshot(s) for s in info.snapshots],
            version=info.version,
        )


async def _capacity(manager: Manager) -> registration.Capacity:
    """What a heartbeat tells the control plane about this host."""
    info = await manager.host_info()
    mib = 1 << 20
    return registration.Capacity(
        runtime=info.runtime,
        version=info.version,
        vcpus=info.vcpus,
        memory_mib=info.memory_bytes // mib,
        memory_free_mib=info.memory_free_bytes // mib,
        disk_mib=info.disk_bytes // mib,
        disk_free_mib=info.disk_free_bytes // mib,
        templates=[
            registration.TemplateReport(
                template_id=t.template_id,
                build_id=str(t.build_id),
                vcpus=t.vcpus,
                memory_mib=t.memory_mib,
                disk_mib=t.disk_size_bytes // mib,
                envd_version=t.envd_version,
            )
            for t in info.templates
        ],
    )


async def _health(request: Request) -> Response:
    return Response(status_code=204)


def build(settings: AgentSettings) -> ASGIApp:
    """The whole agent. Its lifespan starts the manager, runs the background tasks (the base
    template's build unless turned off; registration and heartbeats when a control plane is
    set) and closes the manager at shutdown."""
    manager = Manager(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await manager.start()
        try:
            background: list[asyncio.Task[None]] = []
            async with asyncio.TaskGroup() as tasks:
                if settings.warm_base_template:
                    background.append(tasks.create_task(manager.warm()))
                if settings.control_plane_url:
                    creds = await registration.load_or_register(
                        settings.state_dir,
                        settings.control_plane_url,
                        settings.registration_token,
                        settings.advertise_url or f"http://{settings.host}:{settings.port}",
                    )
                    heartbeats = registration.heartbeat_loop(
                        settings.control_plane_url,
                        creds,
                        lambda: _capacity(manager),
                        interval_s=settings.heartbeat_interval_s,
                    )
                    background.append(tasks.create_task(heartbeats))
                try:
                    yield
                finally:
                    for task in background:
                        task.cancel()
        finally:
            await manager.close()

    def resolve(sandbox_id: str) -> forward.Target:
        vm = manager.running_instance(sandbox_id)
        return forward.Target(
            address=vm.address, client=vm.envd.streaming, connections=vm.connections
        )

    http = Starlette(routes=[Route("/health", _health, methods=["GET"])], lifespan=lifespan)
    rpc = HostAgentASGIApplication(HostAgentService(manager), interceptors=[ErrorInterceptor()])
    forwarder = forward.Forwarder(resolve)

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and path.startswith(forward.PREFIX):
            await forwarder(scope, receive, send)
        elif scope["type"] == "http" and path.startswith("/hostagent.HostAgent/"):
            await rpc(scope, receive, send)
        else:
            await http(scope, receive, send)

    # Plain HTTP under /sandboxes/ takes the fast path when served by FastPathProtocol.
    return http1.FastPathApp(dispatch, forwarder.route)
