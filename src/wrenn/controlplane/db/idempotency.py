"""Idempotency keys of creates, per team: the first request with a key claims it; the ones
after it find the claim (in progress, or done with the response to replay)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.inserts import insert_ignoring_conflict
from wrenn.controlplane.db.records import IdempotentRequest
from wrenn.controlplane.db.tables import IdempotencyKeyRow


def _request(row: IdempotencyKeyRow) -> IdempotentRequest:
    return IdempotentRequest(
        team_id=row.team_id,
        key=row.key,
        fingerprint=row.fingerprint,
        status_code=row.status_code,
        response=row.response,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def get(self, team_id: str, key: str) -> IdempotentRequest | None:
        row = await self._s.get(IdempotencyKeyRow, (team_id, key), populate_existing=True)
        return _request(row) if row else None

    async def claim(
        self,
        team_id: str,
        key: str,
        fingerprint: str,
        now: datetime,
        ttl: timedelta,
        abandoned_before: datetime,
    ) -> IdempotentRequest | None:
        """Claim ``key`` for a request with ``fingerprint``: ``None`` when this call got it
        (the caller serves the request, then ``complete``s or ``release``s it); otherwise the
        claim that holds it. An expired key, or one left in progress since before
        ``abandoned_before`` (its server died), is taken over."""
        await self._s.execute(
            delete(IdempotencyKeyRow)
            .where(
                IdempotencyKeyRow.team_id == team_id,
                IdempotencyKeyRow.key == key,
                (IdempotencyKeyRow.expires_at <= now)
                | (
                    IdempotencyKeyRow.status_code.is_(None)
                    & (IdempotencyKeyRow.created_at < abandoned_before)
                ),
            )
            .execution_options(synchronize_session=False)
        )
        result = await self._s.execute(
            insert_ignoring_conflict(self._s, IdempotencyKeyRow, ["team_id", "key"]).values(
                team_id=team_id,
                key=key,
                fingerprint=fingerprint,
                status_code=None,
                response=None,
                created_at=now,
                expires_at=now + ttl,
            )
        )
        if getattr(result, "rowcount", 0) == 1:
            return None
        held = await self.get(team_id, key)
        assert held is not None, "an idempotency key vanished inside its transaction"
        return held

    async def complete(
        self, team_id: str, key: str, status_code: int, response: dict[str, Any]
    ) -> None:
        await self._s.execute(
            update(IdempotencyKeyRow)
            .where(IdempotencyKeyRow.team_id == team_id, IdempotencyKeyRow.key == key)
            .values(status_code=status_code, response=response)
            .execution_options(synchronize_session=False)
        )

    async def release(self, team_id: str, key: str) -> None:
        """Forget a claim whose request failed: a retry with the key tries again."""
        await self._s.execute(
            delete(IdempotencyKeyRow)
            .where(
                IdempotencyKeyRow.team_id == team_id,
                IdempotencyKeyRow.key == key,
                IdempotencyKeyRow.status_code.is_(None),
            )
            .execution_options(synchronize_session=False)
        )

    async def prune(self, now: datetime) -> int:
        result = await self._s.execute(
            delete(IdempotencyKeyRow)
            .where(IdempotencyKeyRow.expires_at <= now)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
