"""Composition of the control plane: ``build`` makes the ASGI app, ``run`` serves it.

Start-up (the app lifespan): migrations (ours, then each extension's), the bootstrap admin key
on an empty database, then the lifecycle worker in a TaskGroup that lives as long as the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from wrenn import log
from wrenn.controlplane import edge
from wrenn.controlplane.bootstrap import bootstrap
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.context import ControlPlane
from wrenn.controlplane.db import Database
from wrenn.controlplane.extension import Extension
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.lifecycle import LifecycleWorker
from wrenn.controlplane.routes import ROUTERS
from wrenn.controlplane.sandboxes import Sandboxes

_log = log.get(__name__)


def build(
    settings: ControlPlaneSettings,
    extensions: Sequence[Extension] = (),
    *,
    announce_bootstrap_key: bool = True,
) -> FastAPI:
    """The control plane app; its ``ControlPlane`` is ``app.state.controlplane`` (after start,
    ``bootstrap_key`` holds the key made on an empty database)."""
    db = Database(settings.resolved_database_url())
    pool = HostPool(settings.agent_timeout_s)
    cp = ControlPlane(
        settings=settings,
        db=db,
        hosts=pool,
        sandboxes=Sandboxes(db, pool, settings),
        extensions=list(extensions),
    )
    locations: list[Traversable | Path] = [
        loc for ext in extensions for loc in ext.migration_locations()
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await db.migrate(locations)
            if settings.bootstrap:
                cp.bootstrap_key = await bootstrap(db)
                if cp.bootstrap_key is not None and announce_bootstrap_key:
                    print(
                        "wrenn-cp: created the admin team; its API key (shown once): "
                        f"{cp.bootstrap_key.api_key}",
                        flush=True,
                    )
            worker = LifecycleWorker(db, cp.sandboxes, settings.lifecycle_interval_s)
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(worker.run(), name="lifecycle")
                _log.info("controlplane.started", port=settings.port, database=db.dialect)
                try:
                    yield
                finally:
                    task.cancel()
        finally:
            await pool.aclose()
            await db.aclose()

    app = FastAPI(
        title="Wrenn control plane",
        version="0.1.0",
        summary="E2B-compatible sandbox API, plus Wrenn's own under /v1",
        lifespan=lifespan,
    )
    app.state.controlplane = cp
    edge.install(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/health", tags=["health"], status_code=204)
    async def health() -> None:
        return None

    for ext in extensions:
        ext.install(app, cp)
    return app


def run(
    *, config: ControlPlaneSettings | None = None, extensions: Sequence[Extension] = ()
) -> None:
    """The whole control plane process: settings, logging, app, HTTP server."""
    settings = config or ControlPlaneSettings()
    log.configure(settings.log_level)
    server = uvicorn.Server(
        uvicorn.Config(
            build(settings, extensions),
            host=settings.host,
            port=settings.port,
            lifespan="on",
            log_config=None,
            access_log=False,
        )
    )
    server.run()
    if not server.started:
        sys.exit(1)
