"""Run the shipped Alembic migrations (and any an extension adds) at start.

Our revisions live in ``migrations/versions`` on the ``wrenn`` branch. An extension package
ships its own version directory whose first revision ``depends_on`` one of ours; passing that
directory in ``extra_locations`` makes ``upgrade heads`` run both histories in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from wrenn import log

_log = log.get(__name__)

MIGRATIONS = resources.files("wrenn.controlplane.db.migrations")


def _config(script_dir: Path, locations: Sequence[Path], connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_dir))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, extra_locations: Sequence[Traversable | Path]) -> None:
    with ExitStack() as stack:
        script_dir = stack.enter_context(resources.as_file(MIGRATIONS))
        locations = [script_dir / "versions"]
        for loc in extra_locations:
            locations.append(stack.enter_context(resources.as_file(loc)))
        command.upgrade(_config(script_dir, locations, connection), "heads")


def _current(connection: Connection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(connection).get_current_heads())


async def upgrade(engine: AsyncEngine, extra_locations: Sequence[Traversable | Path] = ()) -> None:
    """Bring the database to the newest revision of every branch."""
    async with engine.begin() as conn:
        before = await conn.run_sync(_current)
        await conn.run_sync(_upgrade, extra_locations)
        after = await conn.run_sync(_current)
    if before != after:
        _log.info("db.migrated", before=sorted(before), after=sorted(after))


async def current_heads(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
