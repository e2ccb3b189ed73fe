"""Webhook deliveries: one event on its way to one channel. A worker claims due deliveries
with a lease (compare-and-set on ``locked_until``), so replicas sharing the database never
send one delivery twice at once."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import Delivery, DeliveryStatus
from wrenn.controlplane.db.tables import DeliveryRow


def _delivery(row: DeliveryRow) -> Delivery:
    return Delivery(
        id=row.id,
        channel_id=row.channel_id,
        event_id=row.event_id,
        event_type=row.event_type,
        payload=dict(row.payload),
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_status=row.last_status,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


class DeliveryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def enqueue(
        self,
        channel_id: str,
        *,
        event_id: str,
        event_type: str,
        payload: dict[str, Any],
        now: datetime,
    ) -> None:
        self._s.add(
            DeliveryRow(
                channel_id=channel_id,
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                status=DeliveryStatus.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        await self._s.flush()

    async def claim_due(self, now: datetime, lease: timedelta, limit: int) -> list[Delivery]:
        """Pending deliveries due by ``now`` that no worker holds, now held until
        ``now + lease``."""
        free = or_(DeliveryRow.locked_until.is_(None), DeliveryRow.locked_until <= now)
        candidates = list(
            await self._s.scalars(
                select(DeliveryRow.id)
                .where(
                    DeliveryRow.status == DeliveryStatus.PENDING.value,
                    DeliveryRow.next_attempt_at <= now,
                    free,
                )
                .order_by(DeliveryRow.next_attempt_at, DeliveryRow.id)
                .limit(limit)
            )
        )
        claimed: list[Delivery] = []
        for delivery_id in candidates:
            result = await self._s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == delivery_id, free)
                .values(locked_until=now + lease)
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) == 1:
                row = await self._s.get(DeliveryRow, delivery_id, populate_existing=True)
                if row is not None:
                    claimed.append(_delivery(row))
        return claimed

    async def record_attempt(
        self,
        delivery_id: int,
        *,
        status: DeliveryStatus,
        http_status: int | None,
        error: str | None,
        now: datetime,
        next_attempt_at: datetime | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status.value,
            "attempts": DeliveryRow.attempts + 1,
            "last_status": http_status,
            "last_error": error[:512] if error else None,
            "locked_until": None,
        }
        if status is DeliveryStatus.DELIVERED:
            values["delivered_at"] = now
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        await self._s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == delivery_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    async def of_channel(self, channel_id: str, limit: int = 100) -> list[Delivery]:
        rows = await self._s.scalars(
            select(DeliveryRow)
            .where(DeliveryRow.channel_id == channel_id)
            .order_by(DeliveryRow.id.desc())
            .limit(limit)
        )
        return [_delivery(r) for r in rows]
