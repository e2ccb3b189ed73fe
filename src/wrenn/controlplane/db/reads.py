"""Reads of one statement each, outside any transaction: the listings.

Each statement is atomic on its own, so it sees one consistent state of the database (two of
them need not see the same one). Leaving out the transaction spares its BEGIN and COMMIT: on
SQLite two more trips to aiosqlite's thread, on PostgreSQL two round trips.

On SQLite the sandbox listing goes to one connection kept for it and shared by every listing
in flight: aiosqlite queues their statements on that connection's thread, which keeps taking
them while they come instead of being woken for each, as a connection of its own per request
would be (waking a thread costs more than a page's query). On PostgreSQL each listing takes a
pooled connection for its one round trip (asyncpg runs one statement at a time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wrenn.controlplane.db.records import Page, SandboxSummary, Snapshot
from wrenn.controlplane.db.sandboxes import SandboxQuery, sandbox_page
from wrenn.controlplane.db.snapshots import snapshot_page


class Reads:
    def __init__(self, engine: AsyncEngine) -> None:
        """``engine``: one whose connections begin no transaction."""
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._shared: AsyncConnection | None = None
        self._shared_driver: Any = None
        self._opening = asyncio.Lock()

    async def sandboxes(self, query: SandboxQuery) -> Page[SandboxSummary]:
        dialect = self._engine.dialect
        if self._sqlite:
            driver = await self._sqlite_driver()
            return await sandbox_page(driver.execute_fetchall, dialect, query)
        async with self._engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None, "a connection checked out of the pool"

            async def fetch(sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
                rows: Sequence[Sequence[Any]] = await driver.fetch(sql, *params)
                return rows

            return await sandbox_page(fetch, dialect, query)

    async def snapshots(
        self,
        team_id: str,
        *,
        sandbox_id: str | None = None,
        name: str | None = None,
        limit: int = 100,
        next_token: str | None = None,
    ) -> Page[Snapshot]:
        async with self._engine.connect() as conn:
            return await snapshot_page(
                conn,
                team_id,
                sandbox_id=sandbox_id,
                name=name,
                limit=limit,
                next_token=next_token,
            )

    async def _sqlite_driver(self) -> Any:
        """The aiosqlite connection the sandbox listings share, opened at the first."""
        if self._shared_driver is None:
            async with self._opening:
                if self._shared_driver is None:
                    conn = await self._engine.connect()
                    try:
                        driver = (await conn.get_raw_connection()).driver_connection
                    except BaseException:
                        await conn.close()
                        raise
                    self._shared, self._shared_driver = conn, driver
        return self._shared_driver

    async def aclose(self) -> None:
        """Give the shared connection back (before the engine is disposed of)."""
        if self._shared is not None:
            shared, self._shared, self._shared_driver = self._shared, None, None
            await shared.close()
