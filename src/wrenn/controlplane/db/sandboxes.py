"""Sandboxes and their metadata. State changes are compare-and-set (``transition``), so two
requests (or a request and the lifecycle worker) never both act on one sandbox."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Row, and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import Page, Sandbox, SandboxState
from wrenn.controlplane.db.tables import SandboxMetadataRow, SandboxRow
from wrenn.core.errors import InvalidArgument

#: Columns ``transition`` and ``update`` may set besides ``state``.
_UPDATABLE = frozenset(
    {"host_id", "envd_version", "build_id", "started_at", "end_at", "ended_at", "auto_pause"}
)


@dataclass(frozen=True)
class SandboxQuery:
    team_id: str
    states: Collection[SandboxState]
    metadata: dict[str, str] = field(default_factory=dict)
    template_id: str | None = None
    started_after: datetime | None = None
    order: Literal["asc", "desc"] = "asc"
    limit: int = 100
    next_token: str | None = None


def encode_cursor(started_at: datetime, sandbox_id: str) -> str:
    micros = int(started_at.timestamp() * 1_000_000)
    return base64.urlsafe_b64encode(f"{micros}|{sandbox_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        micros, sandbox_id = raw.split("|", 1)
        return datetime.fromtimestamp(int(micros) / 1_000_000, UTC), sandbox_id
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError) as err:
        raise InvalidArgument(f"invalid nextToken: {token!r}") from err


def _sandbox(row: SandboxRow | Row[Any], metadata: dict[str, str]) -> Sandbox:
    return Sandbox(
        id=row.id,
        team_id=row.team_id,
        host_id=row.host_id,
        template_id=row.template_id,
        alias=row.alias,
        snapshot_id=row.snapshot_id,
        state=SandboxState(row.state),
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        disk_mib=row.disk_mib,
        envd_version=row.envd_version,
        envd_access_token=row.envd_access_token,
        allow_internet_access=row.allow_internet_access,
        auto_pause=row.auto_pause,
        auto_resume=row.auto_resume,
        build_id=row.build_id,
        started_at=row.started_at,
        end_at=row.end_at,
        created_at=row.created_at,
        metadata=metadata,
        traffic_access_token=row.traffic_access_token,
        ended_at=row.ended_at,
    )


class SandboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def insert(self, sandbox: Sandbox) -> None:
        self._s.add(
            SandboxRow(
                id=sandbox.id,
                team_id=sandbox.team_id,
                host_id=sandbox.host_id,
                template_id=sandbox.template_id,
                alias=sandbox.alias,
                snapshot_id=sandbox.snapshot_id,
                state=sandbox.state.value,
                vcpus=sandbox.vcpus,
                memory_mib=sandbox.memory_mib,
                disk_mib=sandbox.disk_mib,
                envd_version=sandbox.envd_version,
                envd_access_token=sandbox.envd_access_token,
                allow_internet_access=sandbox.allow_internet_access,
                auto_pause=sandbox.auto_pause,
                auto_resume=sandbox.auto_resume,
                build_id=sandbox.build_id,
                started_at=sandbox.started_at,
                end_at=sandbox.end_at,
                created_at=sandbox.created_at,
                traffic_access_token=sandbox.traffic_access_token,
            )
        )
        await self._s.flush()  # the row first: metadata rows reference it
        for key, value in sandbox.metadata.items():
            self._s.add(SandboxMetadataRow(sandbox_id=sandbox.id, key=key, value=value))
        await self._s.flush()

    async def _metadata(self, sandbox_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        wanted = list(sandbox_ids)
        out: dict[str, dict[str, str]] = {sid: {} for sid in wanted}
        if not wanted:
            return out
        # Plain rows, not ORM objects: listings read hundreds of them.
        rows = await self._s.execute(
            select(
                SandboxMetadataRow.sandbox_id, SandboxMetadataRow.key, SandboxMetadataRow.value
            ).where(SandboxMetadataRow.sandbox_id.in_(wanted))
        )
        for sandbox_id, key, value in rows:
            out[sandbox_id][key] = value
        return out

    async def get(self, sandbox_id: str) -> Sandbox | None:
        row = await self._s.get(SandboxRow, sandbox_id, populate_existing=True)
        if row is None:
            return None
        return _sandbox(row, (await self._metadata([row.id]))[row.id])

    async def get_many(self, sandbox_ids: Collection[str]) -> dict[str, Sandbox]:
        """The sandboxes of these ids that exist, by id."""
        wanted = list(sandbox_ids)
        if not wanted:
            return {}
        rows = list(await self._s.scalars(select(SandboxRow).where(SandboxRow.id.in_(wanted))))
        return {s.id: s for s in await self._records(rows)}

    async def _records(self, rows: Sequence[SandboxRow | Row[Any]]) -> list[Sandbox]:
        metadata = await self._metadata(r.id for r in rows)
        return [_sandbox(r, metadata[r.id]) for r in rows]

    async def page(self, query: SandboxQuery) -> Page[Sandbox]:
        conditions: list[ColumnElement[bool]] = [
            SandboxRow.team_id == query.team_id,
            SandboxRow.state.in_([s.value for s in query.states]),
        ]
        for key, value in query.metadata.items():
            conditions.append(
                exists().where(
                    SandboxMetadataRow.sandbox_id == SandboxRow.id,
                    SandboxMetadataRow.key == key,
                    SandboxMetadataRow.value == value,
                )
            )
        if query.template_id is not None:
            conditions.append(
                or_(
                    SandboxRow.template_id == query.template_id,
                    SandboxRow.alias == query.template_id,
                )
            )
        if query.started_after is not None:
            conditions.append(SandboxRow.started_at >= query.started_after)
        if query.next_token:
            at, last_id = decode_cursor(query.next_token)
            if query.order == "asc":
                conditions.append(
                    or_(
                        SandboxRow.started_at > at,
                        and_(SandboxRow.started_at == at, SandboxRow.id > last_id),
                    )
                )
            else:
                conditions.append(
                    or_(
                        SandboxRow.started_at < at,
                        and_(SandboxRow.started_at == at, SandboxRow.id < last_id),
                    )
                )
        order = (
            (SandboxRow.started_at.asc(), SandboxRow.id.asc())
            if query.order == "asc"
            else (SandboxRow.started_at.desc(), SandboxRow.id.desc())
        )
        # Plain rows, not ORM objects: a page is up to a thousand of them.
        rows = list(
            await self._s.execute(
                select(SandboxRow.__table__)
                .where(*conditions)
                .order_by(*order)
                .limit(query.limit + 1)
            )
        )
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        token = encode_cursor(rows[-1].started_at, rows[-1].id) if more and rows else None
        return Page(items=await self._records(rows), next_token=token)

    async def transition(
        self,
        sandbox_id: str,
        from_states: Collection[SandboxState],
        to_state: SandboxState,
        **values: Any,
    ) -> Sandbox | None:
        """Move the sandbox to ``to_state`` if it is in one of ``from_states``; the updated
        record, or ``None`` when it was not (someone else moved it first)."""
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        result = await self._s.execute(
            update(SandboxRow)
            .where(
                SandboxRow.id == sandbox_id, SandboxRow.state.in_([s.value for s in from_states])
            )
            .values(state=to_state.value, **values)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            return None
        return await self.get(sandbox_id)

    async def update(self, sandbox_id: str, **values: Any) -> Sandbox | None:
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        await self._s.execute(
            update(SandboxRow)
            .where(SandboxRow.id == sandbox_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return await self.get(sandbox_id)

    async def expired(self, now: datetime, limit: int = 100) -> list[Sandbox]:
        """Running sandboxes whose end time has passed, the longest overdue first."""
        rows = list(
            await self._s.scalars(
                select(SandboxRow)
                .where(SandboxRow.state == SandboxState.RUNNING.value, SandboxRow.end_at <= now)
                .order_by(SandboxRow.end_at)
                .limit(limit)
            )
        )
        return await self._records(rows)

    async def on_host(self, host_id: str, states: Collection[SandboxState]) -> list[Sandbox]:
        rows = list(
            await self._s.scalars(
                select(SandboxRow).where(
                    SandboxRow.host_id == host_id,
                    SandboxRow.state.in_([s.value for s in states]),
                )
            )
        )
        return await self._records(rows)
