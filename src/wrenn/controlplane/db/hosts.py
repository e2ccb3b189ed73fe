"""Hosts, their one-time registration tokens, heartbeats and the load committed on them."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane import ids
from wrenn.controlplane.db.records import ACTIVE_STATES, Capacity, Host, HostLoad, HostStatus
from wrenn.controlplane.db.tables import HostRow, HostTokenRow, SandboxRow


def _host(row: HostRow) -> Host:
    return Host(
        id=row.id,
        address=row.address,
        status=HostStatus(row.status),
        runtime=row.runtime,
        version=row.version,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        memory_free_mib=row.memory_free_mib,
        disk_mib=row.disk_mib,
        disk_free_mib=row.disk_free_mib,
        last_heartbeat_at=row.last_heartbeat_at,
        created_at=row.created_at,
        down_at=row.down_at,
    )


class HostRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create_token(self, ttl: timedelta) -> tuple[str, datetime]:
        secret = ids.host_token()
        now = datetime.now(UTC)
        self._s.add(
            HostTokenRow(token_hash=ids.digest(secret), created_at=now, expires_at=now + ttl)
        )
        await self._s.flush()
        return secret, now + ttl

    async def consume_token(self, secret: str) -> bool:
        """Mark an unused, unexpired token used; false when it was neither."""
        now = datetime.now(UTC)
        result = await self._s.execute(
            update(HostTokenRow)
            .where(
                HostTokenRow.token_hash == ids.digest(secret),
                HostTokenRow.used_at.is_(None),
                HostTokenRow.expires_at > now,
            )
            .values(used_at=now)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    async def register(self, address: str) -> tuple[Host, str]:
        secret = ids.host_secret()
        row = HostRow(
            id=ids.host_id(),
            address=address,
            secret_hash=ids.digest(secret),
            status=HostStatus.ACTIVE.value,
            runtime="",
            version="",
            vcpus=0,
            memory_mib=0,
            memory_free_mib=0,
            disk_mib=0,
            disk_free_mib=0,
            created_at=datetime.now(UTC),
        )
        self._s.add(row)
        await self._s.flush()
        return _host(row), secret

    async def authenticate(self, host_id: str, secret: str) -> Host | None:
        row = await self._s.get(HostRow, host_id)
        if row is None or not hmac.compare_digest(row.secret_hash, ids.digest(secret)):
            return None
        return _host(row)

    async def heartbeat(self, host_id: str, capacity: Capacity) -> tuple[Host, bool] | None:
        """Record a heartbeat; the host and whether it just came up (its first heartbeat, or
        the first since it was marked down)."""
        row = await self._s.get(HostRow, host_id, with_for_update=True)
        if row is None:
            return None
        came_up = row.last_heartbeat_at is None or row.down_at is not None
        row.down_at = None
        row.runtime = capacity.runtime
        row.version = capacity.version
        row.vcpus = capacity.vcpus
        row.memory_mib = capacity.memory_mib
        row.memory_free_mib = capacity.memory_free_mib
        row.disk_mib = capacity.disk_mib
        row.disk_free_mib = capacity.disk_free_mib
        row.last_heartbeat_at = datetime.now(UTC)
        await self._s.flush()
        return _host(row), came_up

    async def mark_down(self, host_id: str, silent_since: datetime) -> Host | None:
        """Mark the host down if it is still silent since ``silent_since`` and not marked yet;
        the host when this call marked it (exactly one caller wins)."""
        now = datetime.now(UTC)
        result = await self._s.execute(
            update(HostRow)
            .where(
                HostRow.id == host_id,
                HostRow.down_at.is_(None),
                HostRow.last_heartbeat_at.is_not(None),
                HostRow.last_heartbeat_at < silent_since,
            )
            .values(down_at=now)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            return None
        return await self.get(host_id)

    async def get(self, host_id: str) -> Host | None:
        row = await self._s.get(HostRow, host_id, populate_existing=True)
        return _host(row) if row else None

    async def all(self) -> list[Host]:
        rows = await self._s.scalars(select(HostRow).order_by(HostRow.created_at, HostRow.id))
        return [_host(r) for r in rows]

    async def set_status(self, host_id: str, status: HostStatus) -> Host | None:
        row = await self._s.get(HostRow, host_id)
        if row is None:
            return None
        row.status = status.value
        await self._s.flush()
        return _host(row)

    async def loads(self) -> dict[str, HostLoad]:
        """Per host: the sandboxes holding its CPU and memory, and their sum."""
        rows = await self._s.execute(
            select(
                SandboxRow.host_id,
                func.count(),
                func.coalesce(func.sum(SandboxRow.vcpus), 0),
                func.coalesce(func.sum(SandboxRow.memory_mib), 0),
            )
            .where(
                SandboxRow.host_id.is_not(None),
                SandboxRow.state.in_([s.value for s in ACTIVE_STATES]),
            )
            .group_by(SandboxRow.host_id)
        )
        return {
            str(host_id): HostLoad(
                host_id=str(host_id), sandboxes=int(n), vcpus=int(cpu), memory_mib=int(mem)
            )
            for host_id, n, cpu, mem in rows
        }
