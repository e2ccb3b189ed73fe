"""/v1/audit: the audit trail, newest first. A team reads its own entries; an admin team any
team's (``teamID``) or all of them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.db.records import AuditEntry, AuditQuery
from wrenn.controlplane.schemas import wrenn as api
from wrenn.core.errors import InvalidArgument, NotFound

router = APIRouter(prefix="/v1/audit", tags=["audit"])

_Filter = Annotated[str | None, Query(max_length=128)]


def entry_out(e: AuditEntry) -> api.AuditEntryOut:
    return api.AuditEntryOut(
        id=e.id,
        time=e.time,
        team_id=e.team_id,
        actor=e.actor,
        action=e.action,
        target_type=e.target_type,
        target_id=e.target_id,
        result=e.result,
        details=e.details,
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@router.get("")
async def list_audit(
    cp: CP,
    who: Team,
    response: Response,
    team_id: Annotated[str | None, Query(alias="teamID", max_length=64)] = None,
    actor: _Filter = None,
    action: _Filter = None,
    target: _Filter = None,
    since: Annotated[datetime | None, Query(description="entries at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="entries before (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=32)] = None,
) -> list[api.AuditEntryOut]:
    """Entries matching every filter given; ``action`` may end in ``.*`` (a prefix);
    ``x-next-token`` when there is another page."""
    if not who.team.is_admin:
        if team_id is not None and team_id != who.team.id:
            raise NotFound(f"team {team_id!r} not found")
        team_id = who.team.id
    before_id: int | None = None
    if next_token is not None:
        if not next_token.isdigit() or not 0 < int(next_token) < 2**63:
            raise InvalidArgument(f"invalid nextToken: {next_token!r}")
        before_id = int(next_token)
    async with cp.db.transaction() as tx:
        page = await tx.audit.page(
            AuditQuery(
                team_id=team_id,
                actor=actor,
                action=action,
                target_id=target,
                since=_utc(since),
                until=_utc(until),
                limit=limit,
                before_id=before_id,
            )
        )
    if page.next_token:
        response.headers["x-next-token"] = page.next_token
    return [entry_out(e) for e in page.items]
