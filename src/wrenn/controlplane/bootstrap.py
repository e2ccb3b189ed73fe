"""First start and operator commands: the admin team and its key, host registration tokens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.context import BootstrapKey
from wrenn.controlplane.db import Database

if TYPE_CHECKING:
    from wrenn.controlplane.extension import Extension


def _locations(extensions: Sequence[Extension]) -> list[Traversable | Path]:
    return [ext.migrations for ext in extensions if ext.migrations is not None]


async def bootstrap(db: Database) -> BootstrapKey | None:
    """On an empty database: an admin team and an API key for it. ``None`` otherwise."""
    async with db.transaction() as tx:
        await tx.teams.lock()
        if await tx.teams.count() > 0:
            return None
        team = await tx.teams.create("admin", is_admin=True)
        _, secret = await tx.teams.create_key(team.id, "bootstrap")
    return BootstrapKey(team_id=team.id, api_key=secret)


async def create_key(
    settings: ControlPlaneSettings,
    *,
    team_name: str,
    admin: bool = False,
    extensions: Sequence[Extension] = (),
) -> BootstrapKey:
    """A new key for the team named ``team_name`` (the ``wrenn-cp create-key`` command): the
    oldest team of that name and admin flag, created when there is none, so running the
    command again adds a key to the same team."""
    db = Database(settings.resolved_database_url())
    try:
        await db.migrate(_locations(extensions))
        async with db.transaction() as tx:
            await tx.teams.lock()
            named = [t for t in await tx.teams.all() if (t.name, t.is_admin) == (team_name, admin)]
            team = named[0] if named else await tx.teams.create(team_name, is_admin=admin)
            _, secret = await tx.teams.create_key(team.id, "cli")
        return BootstrapKey(team_id=team.id, api_key=secret)
    finally:
        await db.aclose()


async def create_host_token(
    settings: ControlPlaneSettings, *, extensions: Sequence[Extension] = ()
) -> str:
    """A one-time host registration token (the ``wrenn-cp create-host-token`` command)."""
    db = Database(settings.resolved_database_url())
    try:
        await db.migrate(_locations(extensions))
        async with db.transaction() as tx:
            token, _ = await tx.hosts.create_token(timedelta(seconds=settings.host_token_ttl_s))
        return token
    finally:
        await db.aclose()
