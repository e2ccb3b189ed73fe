"""/v1/snapshots: named snapshots of running sandboxes, with where they are stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.context import ServerContext
from wrenn.controlplane.db.records import Principal, Snapshot
from wrenn.controlplane.idempotency import Idempotency, IdempotencyKey, Outcome, fingerprint
from wrenn.controlplane.schemas import wrenn as api

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])


def snapshot_out(s: Snapshot) -> api.SnapshotOut:
    return api.SnapshotOut(
        snapshot_id=s.id,
        name=s.name,
        sandbox_id=s.sandbox_id,
        template_id=s.template_id,
        host_id=s.host_id,
        cpu_count=s.vcpus,
        memory_mb=s.memory_mib,
        size_bytes=s.size_bytes,
        created_at=s.created_at,
    )


@router.post("", status_code=201, response_model=api.SnapshotOut)
async def create_snapshot(
    request: Request,
    body: api.NewSnapshot,
    cp: CP,
    who: Team,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Snapshot a running sandbox (it keeps running); new sandboxes can start from it.
    ``Idempotency-Key``: a retry with the same key returns the first snapshot."""

    async def work() -> Outcome:
        snapshot = await cp.sandboxes.snapshot(who.team.id, body.sandbox_id, body.name)
        return Outcome(201, snapshot_out(snapshot).model_dump(mode="json", by_alias=True))

    return await Idempotency.of(cp.db, cp.config).once(
        who.team.id, idempotency_key, fingerprint(request.method, request.url.path, body), work
    )


async def snapshot_page(
    cp: ServerContext,
    who: Principal,
    response: Response,
    sandbox_id: str | None,
    name: str | None,
    limit: int,
    next_token: str | None,
) -> list[Snapshot]:
    """A page of the team's snapshots, oldest first (the sandbox's only, or those of ``name``
    as name or id); ``x-next-token`` on ``response`` when more follow. Both listings use it:
    this one and E2B's ``GET /snapshots``."""
    page = await cp.db.reads.snapshots(
        who.team.id, sandbox_id=sandbox_id, name=name, limit=limit, next_token=next_token
    )
    if page.next_token:
        response.headers["x-next-token"] = page.next_token
    return page.items


@router.get("")
async def list_snapshots(
    cp: CP,
    who: Team,
    response: Response,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID", max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
) -> list[api.SnapshotOut]:
    page = await snapshot_page(cp, who, response, sandbox_id, name, limit, next_token)
    return [snapshot_out(s) for s in page]


@router.get("/{snapshot_ref:path}")
async def get_snapshot(snapshot_ref: str, cp: CP, who: Team) -> api.SnapshotOut:
    """By id or by name."""
    return snapshot_out(await cp.sandboxes.get_snapshot(who.team.id, snapshot_ref))


@router.delete("/{snapshot_ref:path}", status_code=204)
async def delete_snapshot(snapshot_ref: str, cp: CP, who: Team) -> Response:
    await cp.sandboxes.delete_snapshot(who.team.id, snapshot_ref)
    return Response(status_code=204)
