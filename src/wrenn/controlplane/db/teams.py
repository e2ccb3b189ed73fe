"""Teams and their API keys. Keys are stored as SHA-256 digests with a short prefix in clear;
the secret exists only in the return value of ``create_key``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane import ids
from wrenn.controlplane.db.records import ApiKey, Principal, Team
from wrenn.controlplane.db.tables import ApiKeyRow, TeamRow

#: ``last_used_at`` is written at most this often per key.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def _team(row: TeamRow) -> Team:
    return Team(id=row.id, name=row.name, is_admin=row.is_admin, created_at=row.created_at)


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class TeamRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(self, name: str, *, is_admin: bool = False) -> Team:
        row = TeamRow(id=ids.team_id(), name=name, is_admin=is_admin, created_at=datetime.now(UTC))
        self._s.add(row)
        await self._s.flush()
        return _team(row)

    async def get(self, team_id: str) -> Team | None:
        row = await self._s.get(TeamRow, team_id)
        return _team(row) if row else None

    async def all(self) -> list[Team]:
        rows = await self._s.scalars(select(TeamRow).order_by(TeamRow.created_at, TeamRow.id))
        return [_team(r) for r in rows]

    async def lock(self) -> None:
        """Hold other writers of the teams table off until this transaction ends (SQLite's
        BEGIN IMMEDIATE already does)."""
        if self._s.get_bind().dialect.name == "postgresql":
            await self._s.execute(text("LOCK TABLE teams IN SHARE ROW EXCLUSIVE MODE"))

    async def count(self) -> int:
        return int(await self._s.scalar(select(func.count()).select_from(TeamRow)) or 0)

    async def create_key(self, team_id: str, name: str) -> tuple[ApiKey, str]:
        """A new key for ``team_id`` and its secret (returned here and never again)."""
        secret = ids.api_key()
        row = ApiKeyRow(
            id=ids.key_id(),
            team_id=team_id,
            name=name,
            prefix=ids.shown_prefix(secret),
            key_hash=ids.digest(secret),
            created_at=datetime.now(UTC),
        )
        self._s.add(row)
        await self._s.flush()
        return _key(row), secret

    async def list_keys(self, team_id: str) -> list[ApiKey]:
        rows = await self._s.scalars(
            select(ApiKeyRow)
            .where(ApiKeyRow.team_id == team_id)
            .order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        )
        return [_key(r) for r in rows]

    async def revoke_key(self, team_id: str, key_id: str) -> ApiKey | None:
        row = await self._s.get(ApiKeyRow, key_id)
        if row is None or row.team_id != team_id:
            return None
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            await self._s.flush()
        return _key(row)

    async def authenticate(self, secret: str) -> Principal | None:
        """The team a live key belongs to; ``None`` for an unknown or revoked key."""
        row = await self._s.scalar(
            select(ApiKeyRow).where(ApiKeyRow.key_hash == ids.digest(secret))
        )
        if row is None or row.revoked_at is not None:
            return None
        team = await self._s.get(TeamRow, row.team_id)
        if team is None:
            return None
        now = datetime.now(UTC)
        if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
            await self._s.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == row.id).values(last_used_at=now)
            )
        return Principal(team=_team(team), key_id=row.id)
