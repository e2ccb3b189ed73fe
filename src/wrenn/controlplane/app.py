"""Composition of the control plane: ``build`` makes the ASGI app, ``run`` is the whole process.

Start-up (the app lifespan): migrations (ours, then each extension's), the bootstrap admin key
on an empty database, then the workers — lifecycle, reconciler, metrics sampler, webhook
deliveries and every extension's — in one TaskGroup that lives as long as the app.

Requests pass, outermost first: plain HTTP sandbox traffic takes the proxy's fast path
(``SandboxProxy.route_api``, never an ASGI message); other sandbox traffic goes to the proxy
(``ProxyDispatch``); request id; NUL refusal; audit; extensions' middleware; error mapping;
the routes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

import uvicorn
import uvloop
from fastapi import FastAPI

from wrenn import log
from wrenn.controlplane import bootstrap, edge
from wrenn.controlplane.audit import Audit, AuditMiddleware
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.context import ServerContext
from wrenn.controlplane.db import Database
from wrenn.controlplane.events import Events
from wrenn.controlplane.extension import Extension, Worker, routers_of
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.keycache import KeyCache
from wrenn.controlplane.lifecycle import LifecycleWorker
from wrenn.controlplane.proxy import ProxyDispatch, SandboxProxy
from wrenn.controlplane.reconciler import Reconciler
from wrenn.controlplane.routes import ROUTERS
from wrenn.controlplane.sampler import MetricsSampler
from wrenn.controlplane.sandboxes import Sandboxes, policy_of
from wrenn.controlplane.scheduler import Scheduler
from wrenn.controlplane.webhooks import RetryPolicy, WebhookWorker
from wrenn.core import http1

_log = log.get(__name__)


def context(settings: ControlPlaneSettings, extensions: Sequence[Extension] = ()) -> ServerContext:
    """Everything a control plane process owns, not started yet."""
    db = Database(settings.resolved_database_url())
    pool = HostPool(settings.agent_timeout_s)
    events = Events()
    placement = Scheduler(policy_of(settings))
    return ServerContext(
        config=settings,
        db=db,
        hosts=pool,
        scheduler=placement,
        sandboxes=Sandboxes(db, pool, settings, placement, events),
        audit=Audit(db),
        events=events,
        keys=KeyCache(settings.api_key_cache_s),
        extensions=list(extensions),
    )


async def _extension_worker(name: str, worker: Worker, ctx: ServerContext) -> None:
    try:
        await worker(ctx)
    except Exception:
        # Task boundary: one extension's failing worker must not stop the control plane.
        _log.exception("extension.worker_failed", extension=name)


def build(
    settings: ControlPlaneSettings,
    extensions: Sequence[Extension] = (),
    *,
    announce_bootstrap_key: bool = True,
) -> FastAPI:
    """The control plane app. ``app.state.context`` is its ``ServerContext`` (after start,
    ``bootstrap_key`` holds the key made on an empty database); ``app.state.proxy`` the
    sandbox proxy, which ``serve`` also puts on its own port."""
    ctx = context(settings, extensions)
    proxy = SandboxProxy(ctx)
    locations: list[Traversable | Path] = [
        ext.migrations for ext in extensions if ext.migrations is not None
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await ctx.db.migrate(locations)
            if settings.bootstrap:
                ctx.bootstrap_key = await bootstrap.bootstrap(ctx.db)
                if ctx.bootstrap_key is not None and announce_bootstrap_key:
                    print(
                        "wrenn-cp: created the admin team; its API key (shown once): "
                        f"{ctx.bootstrap_key.api_key}",
                        flush=True,
                    )
            workers = {
                "lifecycle": LifecycleWorker(
                    ctx.db, ctx.sandboxes, ctx.audit, settings.lifecycle_interval_s
                ).run(),
                "reconciler": Reconciler(
                    ctx.db,
                    ctx.hosts,
                    ctx.sandboxes,
                    ctx.scheduler,
                    ctx.events,
                    ctx.audit,
                    interval_s=settings.reconcile_interval_s,
                    lost_grace_s=settings.host_lost_grace_s,
                ).run(),
                "metrics": MetricsSampler(
                    ctx.db,
                    ctx.hosts,
                    ctx.scheduler,
                    interval_s=settings.metrics_interval_s,
                    retention_s=settings.metrics_retention_s,
                ).run(),
                "webhooks": WebhookWorker(
                    ctx.db,
                    ctx.events,
                    RetryPolicy(
                        max_attempts=settings.webhook_max_attempts,
                        base_s=settings.webhook_backoff_base_s,
                        cap_s=settings.webhook_backoff_cap_s,
                    ),
                    timeout_s=settings.webhook_timeout_s,
                    poll_s=settings.webhook_poll_s,
                ).run(),
            }
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(work, name=name) for name, work in workers.items()]
                for ext in extensions:
                    for worker in ext.workers:
                        tasks.append(
                            tg.create_task(
                                _extension_worker(ext.name, worker, ctx), name=f"ext:{ext.name}"
                            )
                        )
                ctx.started.set()
                _log.info(
                    "controlplane.started",
                    port=settings.port,
                    proxy_port=settings.proxy_port,
                    database=ctx.db.dialect,
                    extensions=[ext.name for ext in extensions],
                )
                try:
                    yield
                finally:
                    ctx.started.clear()
                    for task in tasks:
                        task.cancel()
        finally:
            await proxy.aclose()
            await ctx.hosts.aclose()
            await ctx.db.aclose()

    app = FastAPI(
        title="Wrenn control plane",
        version="0.1.0",
        summary="E2B-compatible sandbox API, plus Wrenn's own under /v1",
        lifespan=lifespan,
    )
    app.state.context = ctx
    app.state.proxy = proxy
    for ext in extensions:
        for entry in reversed(ext.middleware):
            app.add_middleware(entry.cls, *entry.args, **entry.kwargs)
    app.add_middleware(AuditMiddleware, audit=ctx.audit)
    edge.install(app)
    app.add_middleware(ProxyDispatch, proxy=proxy)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/health", tags=["health"], status_code=204)
    async def health() -> None:
        return None

    for ext in extensions:
        for router in routers_of(ext):
            app.include_router(router)
    return app


async def serve(app: FastAPI, settings: ControlPlaneSettings) -> bool:
    """Serve the API and, on ``proxy_port``, the sandbox proxy, until a signal ends them;
    whether the API started."""

    def config(asgi: object, port: int, lifespan: Literal["on", "off"]) -> uvicorn.Config:
        return uvicorn.Config(
            asgi,  # type: ignore[arg-type]
            host=settings.host,
            port=port,
            lifespan=lifespan,
            log_config=None,
            access_log=False,
            http=http1.FastPathProtocol,
        )

    proxy: SandboxProxy = app.state.proxy
    http1.redirect_in_kernel(settings.proxy_redirect_in_kernel)
    api = uvicorn.Server(config(http1.FastPathApp(app, proxy.route_api), settings.port, "on"))
    servers = [api]
    if settings.proxy_port:
        fast_proxy = http1.FastPathApp(proxy, proxy.route)
        servers.append(uvicorn.Server(config(fast_proxy, settings.proxy_port, "off")))

    def end_all(_: object) -> None:
        # One ending (a signal, a failed start) ends the others.
        for server in servers:
            server.should_exit = True

    async with asyncio.TaskGroup() as tg:
        for server in servers:
            tg.create_task(server.serve()).add_done_callback(end_all)
    return bool(api.started)


def settle_heap() -> None:
    """Take what is alive at start (modules, the app, its routes and models: most of the heap)
    out of the garbage collector's sight, so that its full collections walk only what came
    after instead of all of it again each time (hundreds of milliseconds on a small busy
    machine, in the middle of requests). For a process that serves one app until it ends:
    cycles among these objects are never collected."""
    gc.collect()
    gc.freeze()


def _commands(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wrenn-cp", description="Wrenn control plane")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API and the sandbox proxy (the default)")
    key = commands.add_parser(
        "create-key", help="print a new API key for a team, creating the team if it is new"
    )
    key.add_argument("--team", default="default", help="name of the team")
    key.add_argument("--admin", action="store_true", help="make the team an admin team")
    commands.add_parser("create-host-token", help="print a one-time host registration token")
    return parser.parse_args(argv)


def run(
    *,
    extensions: Sequence[Extension] = (),
    config: ControlPlaneSettings | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """The whole control plane process: command line, settings, logging, app, servers.
    A distribution with extensions calls this from its own entry point."""
    args = _commands(argv)
    settings = config or ControlPlaneSettings()
    if args.command == "create-key":
        made = asyncio.run(
            bootstrap.create_key(
                settings, team_name=args.team, admin=args.admin, extensions=extensions
            )
        )
        print(f"team {made.team_id}\nAPI key (shown once): {made.api_key}")
        return
    if args.command == "create-host-token":
        print(asyncio.run(bootstrap.create_host_token(settings, extensions=extensions)))
        return
    log.configure(settings.log_level)
    try:
        # uvloop, as envd and the agent run: the API's request rate is bound by the loop.
        app = build(settings, extensions)
        settle_heap()
        started = uvloop.run(serve(app, settings))
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT it shut down on once both servers have stopped: the
        # stop was clean and asked for, so it ends the process without a traceback.
        return
    if not started:
        sys.exit(1)
