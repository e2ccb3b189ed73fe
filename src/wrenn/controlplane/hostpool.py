"""Connect clients to the host agents (proto/hostagent/hostagent.proto), one per host.

Every call goes through ``AgentClient``, which turns the agent's Connect errors back into
``wrenn.core.errors`` classes (the code travels, the class is rebuilt) so the REST edge maps
them like any other error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from wrenn import log
from wrenn.controlplane.db.records import Host
from wrenn.core.errors import Unavailable, WrennError, from_code
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

_log = log.get(__name__)

R = TypeVar("R")


class AgentClient:
    """The RPCs the control plane makes on one host, with errors mapped."""

    def __init__(self, host_id: str, address: str, timeout_s: float) -> None:
        self.host_id = host_id
        self.address = address
        self._client = HostAgentClient(address, timeout_ms=int(timeout_s * 1000))

    async def _call(self, rpc: str, call: Callable[[], Awaitable[R]]) -> R:
        try:
            return await call()
        except ConnectError as err:
            task = asyncio.current_task()
            if err.code is Code.CANCELED and task is not None and task.cancelling():
                # The client library turns our own cancellation into an error; undo that.
                raise asyncio.CancelledError from err
            mapped = from_code(err.code.value, f"host {self.host_id}: {err.message}")
            _log.info("agent.error", host_id=self.host_id, rpc=rpc, code=err.code.value)
            raise mapped from err
        except WrennError:
            raise
        except OSError as err:
            raise Unavailable(f"host {self.host_id} unreachable") from err

    async def create_sandbox(self, req: pb.CreateSandboxRequest) -> pb.SandboxInfo:
        resp = await self._call("CreateSandbox", lambda: self._client.create_sandbox(req))
        return resp.sandbox or pb.SandboxInfo(sandbox_id=req.sandbox_id)

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        req = pb.DestroySandboxRequest(sandbox_id=sandbox_id)
        await self._call("DestroySandbox", lambda: self._client.destroy_sandbox(req))

    async def pause_sandbox(self, sandbox_id: str) -> str:
        req = pb.PauseSandboxRequest(sandbox_id=sandbox_id)
        resp = await self._call("PauseSandbox", lambda: self._client.pause_sandbox(req))
        return resp.build_id

    async def resume_sandbox(self, req: pb.ResumeSandboxRequest) -> pb.SandboxInfo:
        resp = await self._call("ResumeSandbox", lambda: self._client.resume_sandbox(req))
        return resp.sandbox or pb.SandboxInfo(sandbox_id=req.sandbox_id)

    async def update_sandbox_network(self, req: pb.UpdateSandboxNetworkRequest) -> None:
        await self._call("UpdateSandboxNetwork", lambda: self._client.update_sandbox_network(req))

    async def create_snapshot(self, sandbox_id: str, snapshot_id: str) -> pb.SnapshotInfo:
        req = pb.CreateSnapshotRequest(sandbox_id=sandbox_id, snapshot_id=snapshot_id)
        resp = await self._call("CreateSnapshot", lambda: self._client.create_snapshot(req))
        return resp.snapshot or pb.SnapshotInfo(snapshot_id=snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        req = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        await self._call("DeleteSnapshot", lambda: self._client.delete_snapshot(req))

    async def list_sandboxes(self) -> list[pb.SandboxInfo]:
        req = pb.ListSandboxesRequest()
        resp = await self._call("ListSandboxes", lambda: self._client.list_sandboxes(req))
        return list(resp.sandboxes)

    async def sandbox_metrics(self, sandbox_id: str) -> pb.SandboxMetrics | None:
        req = pb.GetSandboxMetricsRequest(sandbox_id=sandbox_id)
        resp = await self._call("GetSandboxMetrics", lambda: self._client.get_sandbox_metrics(req))
        return resp.metrics

    async def sandbox_logs(
        self, sandbox_id: str, start_ms: int, limit: int
    ) -> list[pb.SandboxLogEntry]:
        req = pb.GetSandboxLogsRequest(sandbox_id=sandbox_id, start_ms=start_ms, limit=limit)
        resp = await self._call("GetSandboxLogs", lambda: self._client.get_sandbox_logs(req))
        return list(resp.entries)

    async def host_info(self) -> pb.GetHostInfoResponse:
        req = pb.GetHostInfoRequest()
        return await self._call("GetHostInfo", lambda: self._client.get_host_info(req))

    async def aclose(self) -> None:
        await self._client.close()


class HostPool:
    """Clients by host id, made on first use and rebuilt when a host's address changes."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._clients: dict[str, AgentClient] = {}

    async def get(self, host: Host) -> AgentClient:
        client = self._clients.get(host.id)
        if client is not None and client.address == host.address:
            return client
        if client is not None:
            await client.aclose()
        client = AgentClient(host.id, host.address, self._timeout_s)
        self._clients[host.id] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
