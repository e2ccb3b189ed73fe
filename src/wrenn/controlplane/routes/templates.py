"""Templates through the E2B API: list, get, delete. Deleting a snapshot goes through here
too, as the e2b SDK's ``Sandbox.delete_snapshot`` calls DELETE /templates/{id}."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.db.records import Template
from wrenn.controlplane.schemas import e2b
from wrenn.core.errors import NotFound, PermissionDenied

router = APIRouter(tags=["templates"])


def build_uuid(build_id: str) -> str:
    """The SDK reads a build id as a UUID: ours pass through when they are one, anything else
    maps to a stable name-based UUID."""
    try:
        return str(uuid.UUID(build_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"wrenn:build:{build_id}"))


def template_out(t: Template) -> e2b.Template:
    return e2b.Template(
        template_id=t.id,
        build_id=t.build_id,
        cpu_count=t.vcpus,
        memory_mb=t.memory_mib,
        disk_size_mb=t.disk_mib,
        public=t.public,
        aliases=[],
        names=[t.id],
        created_at=t.created_at,
        updated_at=t.updated_at,
        last_spawned_at=t.last_spawned_at,
        spawn_count=t.spawn_count,
        build_count=1,
        envd_version=t.envd_version,
    )


@router.get("/templates")
async def list_templates(
    cp: CP,
    who: Team,
    team_id: Annotated[str | None, Query(alias="teamID", max_length=64)] = None,
) -> list[e2b.Template]:
    """Public templates and the caller's own (``teamID`` may only name the caller's team)."""
    if team_id is not None and team_id != who.team.id:
        raise PermissionDenied("teamID: not your team")
    async with cp.db.transaction() as tx:
        templates = await tx.templates.visible(who.team.id)
    return [template_out(t) for t in templates]


async def _get(cp: CP, team_id: str, template_id: str) -> Template:
    async with cp.db.transaction() as tx:
        template = await tx.templates.get(template_id, team_id)
    if template is None:
        raise NotFound(f"template {template_id[:128]!r} not found")
    return template


@router.get("/templates/{template_id:path}")
async def get_template(template_id: str, cp: CP, who: Team) -> e2b.TemplateWithBuilds:
    t = await _get(cp, who.team.id, template_id)
    build = e2b.TemplateBuild(
        build_id=build_uuid(t.build_id),
        created_at=t.updated_at,
        updated_at=t.updated_at,
        finished_at=t.updated_at,
        cpu_count=t.vcpus,
        memory_mb=t.memory_mib,
        disk_size_mb=t.disk_mib,
        envd_version=t.envd_version,
    )
    return e2b.TemplateWithBuilds(**template_out(t).model_dump(), builds=[build])


@router.delete("/templates/{template_id:path}", status_code=204)
async def delete_template(template_id: str, cp: CP, who: Team) -> Response:
    """A snapshot of the caller's team, or a template it owns (public ones: admin teams)."""
    async with cp.db.transaction() as tx:
        snapshot = await tx.snapshots.find(who.team.id, template_id)
    if snapshot is not None:
        await cp.sandboxes.delete_snapshot(who.team.id, snapshot.id)
        return Response(status_code=204)
    t = await _get(cp, who.team.id, template_id)
    if t.team_id != who.team.id and not who.team.is_admin:
        raise PermissionDenied(f"template {t.id!r} is not your team's")
    async with cp.db.transaction() as tx:
        await tx.templates.delete(t.id)
    return Response(status_code=204)
