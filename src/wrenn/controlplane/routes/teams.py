"""/v1/teams and their API keys. Admin teams manage every team; any team its own keys."""

from __future__ import annotations

from fastapi import APIRouter, Response

from wrenn.controlplane.auth import CP, Admin, Team
from wrenn.controlplane.db.records import ApiKey, Principal
from wrenn.controlplane.db.records import Team as TeamRecord
from wrenn.controlplane.schemas import wrenn as api
from wrenn.core.errors import NotFound

router = APIRouter(prefix="/v1/teams", tags=["teams"])


def team_out(t: TeamRecord) -> api.TeamOut:
    return api.TeamOut(team_id=t.id, name=t.name, is_admin=t.is_admin, created_at=t.created_at)


def key_out(k: ApiKey) -> api.ApiKeyOut:
    return api.ApiKeyOut(
        key_id=k.id,
        team_id=k.team_id,
        name=k.name,
        prefix=k.prefix,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
        last_used_at=k.last_used_at,
    )


def _own_or_admin(who: Principal, team_id: str) -> None:
    # Another team's id is as unknown to a non-admin as one that does not exist.
    if team_id != who.team.id and not who.team.is_admin:
        raise NotFound(f"team {team_id[:64]!r} not found")


@router.post("", status_code=201)
async def create_team(body: api.NewTeam, cp: CP, _: Admin) -> api.TeamOut:
    async with cp.db.transaction() as tx:
        team = await tx.teams.create(body.name)
    return team_out(team)


@router.get("")
async def list_teams(cp: CP, who: Team) -> list[api.TeamOut]:
    """Every team for an admin; the caller's own otherwise."""
    if not who.team.is_admin:
        return [team_out(who.team)]
    async with cp.db.transaction() as tx:
        teams = await tx.teams.all()
    return [team_out(t) for t in teams]


@router.post("/{team_id}/api-keys", status_code=201)
async def create_key(
    team_id: str, cp: CP, who: Team, body: api.NewApiKey | None = None
) -> api.CreatedApiKey:
    """A new key; its secret is in this response and nowhere else."""
    _own_or_admin(who, team_id)
    body = body or api.NewApiKey()
    async with cp.db.transaction() as tx:
        if await tx.teams.get(team_id) is None:
            raise NotFound(f"team {team_id[:64]!r} not found")
        key, secret = await tx.teams.create_key(team_id, body.name)
    return api.CreatedApiKey(**key_out(key).model_dump(), key=secret)


@router.get("/{team_id}/api-keys")
async def list_keys(team_id: str, cp: CP, who: Team) -> list[api.ApiKeyOut]:
    _own_or_admin(who, team_id)
    async with cp.db.transaction() as tx:
        if await tx.teams.get(team_id) is None:
            raise NotFound(f"team {team_id[:64]!r} not found")
        keys = await tx.teams.list_keys(team_id)
    return [key_out(k) for k in keys]


@router.delete("/{team_id}/api-keys/{key_id}", status_code=204)
async def revoke_key(team_id: str, key_id: str, cp: CP, who: Team) -> Response:
    _own_or_admin(who, team_id)
    async with cp.db.transaction() as tx:
        key = await tx.teams.revoke_key(team_id, key_id)
        tx.after_commit(cp.keys.forget_all)
    if key is None:
        raise NotFound(f"API key {key_id[:64]!r} not found")
    return Response(status_code=204)
