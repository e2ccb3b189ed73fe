"""Sandboxes and their metadata. State changes are compare-and-set (``transition``), so two
requests (or a request and the lifecycle worker) never both act on one sandbox.

A sandbox's metadata is written at insert and never changed after, twice: as one JSON object on
the sandbox's row (``metadata_json``: what reads return, with the row) and as one row per key
(``sandbox_metadata``: what the listing's metadata filters match, by index).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from sqlalchemy import Dialect, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import Page, Sandbox, SandboxState, SandboxSummary
from wrenn.controlplane.db.tables import SandboxMetadataRow, SandboxRow, UtcDateTime
from wrenn.core.errors import InvalidArgument

#: Columns ``transition`` and ``update`` may set besides ``state``.
_UPDATABLE = frozenset(
    {
        "host_id",
        "envd_version",
        "build_id",
        "started_at",
        "end_at",
        "ended_at",
        "auto_pause",
        "allow_internet_access",
        "egress_json",
        "guest_address",
    }
)


def egress_json(allow_out: Collection[str], deny_out: Collection[str]) -> str:
    """The ``egress_json`` column's value."""
    return orjson.dumps({"allowOut": list(allow_out), "denyOut": list(deny_out)}).decode()


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


def _sandbox(row: SandboxRow) -> Sandbox:
    egress = orjson.loads(row.egress_json)
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
        metadata=orjson.loads(row.metadata_json),
        traffic_access_token=row.traffic_access_token,
        ended_at=row.ended_at,
        allow_out=tuple(egress.get("allowOut", ())),
        deny_out=tuple(egress.get("denyOut", ())),
        guest_address=row.guest_address,
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
                metadata_json=orjson.dumps(sandbox.metadata).decode(),
                egress_json=egress_json(sandbox.allow_out, sandbox.deny_out),
                guest_address=sandbox.guest_address,
            )
        )
        await self._s.flush()  # the row first: metadata rows reference it
        for key, value in sandbox.metadata.items():
            self._s.add(SandboxMetadataRow(sandbox_id=sandbox.id, key=key, value=value))
        await self._s.flush()

    async def get(self, sandbox_id: str) -> Sandbox | None:
        row = await self._s.get(SandboxRow, sandbox_id, populate_existing=True)
        return None if row is None else _sandbox(row)

    async def get_many(self, sandbox_ids: Collection[str]) -> dict[str, Sandbox]:
        """The sandboxes of these ids that exist, by id."""
        wanted = list(sandbox_ids)
        if not wanted:
            return {}
        rows = await self._s.scalars(select(SandboxRow).where(SandboxRow.id.in_(wanted)))
        return {row.id: _sandbox(row) for row in rows}

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
        rows = await self._s.scalars(
            select(SandboxRow)
            .where(SandboxRow.state == SandboxState.RUNNING.value, SandboxRow.end_at <= now)
            .order_by(SandboxRow.end_at)
            .limit(limit)
        )
        return [_sandbox(row) for row in rows]

    async def on_host(self, host_id: str, states: Collection[SandboxState]) -> list[Sandbox]:
        rows = await self._s.scalars(
            select(SandboxRow).where(
                SandboxRow.host_id == host_id,
                SandboxRow.state.in_([s.value for s in states]),
            )
        )
        return [_sandbox(row) for row in rows]


# --- the listing ------------------------------------------------------------------------
#
# The listing is the API's busiest read: one statement, written out here and run on the
# driver's own connection in one call — on SQLite one trip to aiosqlite's thread instead of
# four — with none of SQLAlchemy's per-row work. Bound times go through the column type
# (``UtcDateTime``), so they compare with what it stored; read times are turned into aware UTC
# datetimes here, as it would.

#: What a listing reads of a sandbox, in the order of ``SandboxSummary``'s fields.
_SUMMARY_SELECT = (
    "SELECT s.id, s.template_id, s.alias, s.host_id, s.state, s.vcpus, s.memory_mib,"
    " s.disk_mib, s.envd_version, s.started_at, s.end_at, s.metadata_json FROM sandboxes s"
)
_STATES = {state.value: state for state in SandboxState}


def _sqlite_time(text: str) -> datetime:
    # UtcDateTime stores naive UTC text on SQLite. Parsed with its zone in one step: a tenth
    # of the cost of parsing, then replacing the zone, on a page's hundreds of times.
    return datetime.fromisoformat(text + "+00:00")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _same(value: Any) -> Any:
    return value


class _Params:
    """Bound values in order, each placeholder in the driver's style."""

    def __init__(self, dialect: Dialect) -> None:
        if dialect.paramstyle not in ("qmark", "numeric_dollar"):
            raise NotImplementedError(f"no listing for the {dialect.name} driver")
        self._dialect = dialect
        self._dollar = dialect.paramstyle == "numeric_dollar"
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}" if self._dollar else "?"

    def time(self, value: datetime) -> str:
        """A time as ``UtcDateTime`` binds it (so it compares with what it stored)."""
        bind = _TIME.dialect_impl(self._dialect).bind_processor(self._dialect) or _same
        return self(bind(value))


_TIME = UtcDateTime()


def _page_sql(query: SandboxQuery, p: _Params) -> str:
    where = [
        f"s.team_id = {p(query.team_id)}",
        f"s.state IN ({', '.join(p(s.value) for s in sorted(query.states))})",
    ]
    for key, value in query.metadata.items():
        where.append(
            "EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id"
            f" AND m.key = {p(key)} AND m.value = {p(value)})"
        )
    if query.template_id is not None:
        where.append(
            f"(s.template_id = {p(query.template_id)} OR s.alias = {p(query.template_id)})"
        )
    if query.started_after is not None:
        where.append(f"s.started_at >= {p.time(query.started_after)}")
    direction = "ASC" if query.order == "asc" else "DESC"
    if query.next_token:
        at, last_id = decode_cursor(query.next_token)
        beyond = ">" if query.order == "asc" else "<"
        where.append(
            f"(s.started_at {beyond} {p.time(at)}"
            f" OR (s.started_at = {p.time(at)} AND s.id {beyond} {p(last_id)}))"
        )
    return (
        f"{_SUMMARY_SELECT} WHERE {' AND '.join(where)}"
        f" ORDER BY s.started_at {direction}, s.id {direction} LIMIT {p(query.limit + 1)}"
    )


#: Runs one statement on the driver's connection: its rows.
Fetch = Callable[[str, Sequence[Any]], Awaitable[Sequence[Sequence[Any]]]]


async def sandbox_page(fetch: Fetch, dialect: Dialect, query: SandboxQuery) -> Page[SandboxSummary]:
    """One page of a team's sandboxes, their metadata included, in one statement."""
    if not query.states:
        return Page(items=[], next_token=None)
    params = _Params(dialect)
    sql = _page_sql(query, params)
    rows = await fetch(sql, params.values)
    time = _sqlite_time if dialect.name == "sqlite" else _utc
    # tuple.__new__ straight: the named tuple's own constructor is a Python function, which
    # costs more than the rest of a row's making.
    items = [
        tuple.__new__(
            SandboxSummary,
            (
                r[0],
                r[1],
                r[2],
                r[3],
                _STATES[r[4]],
                r[5],
                r[6],
                r[7],
                r[8],
                time(r[9]),
                time(r[10]),
                r[11],
            ),
        )
        for r in rows[: query.limit]
    ]
    last = items[-1] if len(rows) > query.limit and items else None
    return Page(items=items, next_token=encode_cursor(last.started_at, last.id) if last else None)
