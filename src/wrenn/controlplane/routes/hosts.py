"""/v1/hosts: registration with a one-time token, heartbeats, listing, draining."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter

from wrenn.controlplane import scheduler
from wrenn.controlplane.auth import CP, Admin, HostAuth
from wrenn.controlplane.db.records import Capacity, Host, HostLoad, HostStatus, TemplateReport
from wrenn.controlplane.events import EventType, host_event
from wrenn.controlplane.schemas import wrenn as api
from wrenn.core.errors import NotFound, Unauthenticated

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


def host_out(h: Host, load: HostLoad | None, policy: scheduler.Policy) -> api.HostOut:
    return api.HostOut(
        host_id=h.id,
        address=h.address,
        status=h.status.value,
        live=scheduler.is_live(h, datetime.now(UTC), policy),
        runtime=h.runtime,
        version=h.version,
        cpu_count=h.vcpus,
        memory_mb=h.memory_mib,
        memory_free_mb=h.memory_free_mib,
        disk_size_mb=h.disk_mib,
        disk_free_mb=h.disk_free_mib,
        sandboxes=load.sandboxes if load else 0,
        last_heartbeat_at=h.last_heartbeat_at,
        created_at=h.created_at,
    )


@router.post("/tokens", status_code=201)
async def create_token(cp: CP, _: Admin) -> api.HostToken:
    """A one-time token a host agent registers with (admin)."""
    async with cp.db.transaction() as tx:
        token, expires_at = await tx.hosts.create_token(
            timedelta(seconds=cp.config.host_token_ttl_s)
        )
    return api.HostToken(token=token, expires_at=expires_at)


@router.post("/register", status_code=201)
async def register(body: api.HostRegistration, cp: CP) -> api.RegisteredHost:
    """Trade a one-time token for a host id and the host's secret (shown once)."""
    async with cp.db.transaction() as tx:
        if not await tx.hosts.consume_token(body.token):
            raise Unauthenticated("registration token unknown, used or expired")
        host, secret = await tx.hosts.register(body.address)
    return api.RegisteredHost(host_id=host.id, host_secret=secret)


@router.post("/{host_id}/heartbeat")
async def heartbeat(body: api.Heartbeat, host: HostAuth, cp: CP) -> api.HeartbeatAck:
    """A host's capacity and templates (authenticated with its secret as a bearer token)."""
    capacity = Capacity(
        runtime=body.runtime,
        version=body.version,
        vcpus=body.cpu_count,
        memory_mib=body.memory_mb,
        memory_free_mib=body.memory_free_mb,
        disk_mib=body.disk_size_mb,
        disk_free_mib=body.disk_free_mb,
    )
    reports = [
        TemplateReport(
            id=t.template_id,
            build_id=t.build_id,
            vcpus=t.cpu_count,
            memory_mib=t.memory_mb,
            disk_mib=t.disk_size_mb,
            envd_version=t.envd_version,
        )
        for t in body.templates
    ]
    async with cp.db.transaction() as tx:
        beat = await tx.hosts.heartbeat(host.id, capacity)
        assert beat is not None
        updated, came_up = beat
        await tx.templates.record_reported(reports)
        await tx.host_templates.replace(host.id, reports)
        if came_up:
            await cp.events.emit(tx, host_event(EventType.HOST_UP, updated, runtime=body.runtime))
    return api.HeartbeatAck(host_id=updated.id, status=updated.status.value)


@router.get("")
async def list_hosts(cp: CP, _: Admin) -> list[api.HostOut]:
    async with cp.db.transaction() as tx:
        hosts = await tx.hosts.all()
        loads = await tx.hosts.loads()
    return [host_out(h, loads.get(h.id), cp.scheduler.policy) for h in hosts]


async def _set_status(cp: CP, host_id: str, status: HostStatus) -> api.HostOut:
    async with cp.db.transaction() as tx:
        host = await tx.hosts.set_status(host_id, status)
        loads = await tx.hosts.loads()
    if host is None:
        raise NotFound(f"host {host_id[:64]!r} not found")
    return host_out(host, loads.get(host.id), cp.scheduler.policy)


@router.post("/{host_id}/drain")
async def drain(host_id: str, cp: CP, _: Admin) -> api.HostOut:
    """No new sandboxes go to the host; those on it keep running."""
    return await _set_status(cp, host_id, HostStatus.DRAINING)


@router.post("/{host_id}/activate")
async def activate(host_id: str, cp: CP, _: Admin) -> api.HostOut:
    """Undo a drain."""
    return await _set_status(cp, host_id, HostStatus.ACTIVE)
