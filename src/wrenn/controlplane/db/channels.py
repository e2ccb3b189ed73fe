"""Webhook channels of a team. The signing secret is stored in clear (it signs every delivery)
and leaves this repository only through ``signing_secret``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane import ids
from wrenn.controlplane.db.records import Channel
from wrenn.controlplane.db.tables import ChannelRow, TeamRow


def _channel(row: ChannelRow) -> Channel:
    return Channel(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        url=row.url,
        events=list(row.events or []),
        enabled=row.enabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def matches(patterns: list[str], event_type: str) -> bool:
    """Whether a channel filter takes ``event_type``: empty takes all; ``*`` all;
    ``sandbox.*`` every ``sandbox.`` event; anything else exactly."""
    if not patterns:
        return True
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


class ChannelRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def create(
        self, team_id: str, *, name: str, url: str, events: list[str]
    ) -> tuple[Channel, str]:
        """The new channel and its signing secret (returned only here)."""
        secret = ids.channel_secret()
        now = datetime.now(UTC)
        row = ChannelRow(
            id=ids.channel_id(),
            team_id=team_id,
            name=name,
            url=url,
            secret=secret,
            events=list(events),
            enabled=True,
            created_at=now,
            updated_at=now,
        )
        self._s.add(row)
        await self._s.flush()
        return _channel(row), secret

    async def get(self, team_id: str, channel_id: str) -> Channel | None:
        row = await self._s.get(ChannelRow, channel_id)
        if row is None or row.team_id != team_id:
            return None
        return _channel(row)

    async def by_id(self, channel_id: str) -> Channel | None:
        row = await self._s.get(ChannelRow, channel_id, populate_existing=True)
        return _channel(row) if row else None

    async def of_team(self, team_id: str) -> list[Channel]:
        rows = await self._s.scalars(
            select(ChannelRow)
            .where(ChannelRow.team_id == team_id)
            .order_by(ChannelRow.created_at, ChannelRow.id)
        )
        return [_channel(r) for r in rows]

    async def update(
        self,
        team_id: str,
        channel_id: str,
        *,
        name: str | None = None,
        url: str | None = None,
        events: list[str] | None = None,
        enabled: bool | None = None,
    ) -> Channel | None:
        row = await self._s.get(ChannelRow, channel_id)
        if row is None or row.team_id != team_id:
            return None
        if name is not None:
            row.name = name
        if url is not None:
            row.url = url
        if events is not None:
            row.events = list(events)
        if enabled is not None:
            row.enabled = enabled
        row.updated_at = datetime.now(UTC)
        await self._s.flush()
        return _channel(row)

    async def delete(self, team_id: str, channel_id: str) -> bool:
        result = await self._s.execute(
            delete(ChannelRow).where(ChannelRow.id == channel_id, ChannelRow.team_id == team_id)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    async def subscribed(self, team_id: str | None, event_type: str) -> list[Channel]:
        """Enabled channels taking ``event_type``: the team's own, or for an event of no team
        (hosts), those of admin teams."""
        query = select(ChannelRow).where(ChannelRow.enabled.is_(True))
        if team_id is None:
            query = query.join(TeamRow, TeamRow.id == ChannelRow.team_id).where(
                TeamRow.is_admin.is_(True)
            )
        else:
            query = query.where(ChannelRow.team_id == team_id)
        rows = await self._s.scalars(query.order_by(ChannelRow.id))
        return [_channel(r) for r in rows if matches(list(r.events or []), event_type)]

    async def signing_secret(self, channel_id: str) -> str | None:
        return await self._s.scalar(select(ChannelRow.secret).where(ChannelRow.id == channel_id))
