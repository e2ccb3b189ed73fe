"""The envd ASGI application: Connect services for process and filesystem, plain HTTP for
health, init, env vars, files, metrics and snapshot preparation, all behind the access-token
check."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wrenn import log
from wrenn.core.errors import Unauthenticated, WrennError
from wrenn.envd import files, init, metrics, mmds, snapshot
from wrenn.envd.auth import AccessTokenMiddleware
from wrenn.envd.cgroups import Cgroups
from wrenn.envd.config import EnvdSettings
from wrenn.envd.conntrack import ConnTracker
from wrenn.envd.defaults import Defaults
from wrenn.envd.edge import ErrorInterceptor, error_response, http_error_handler
from wrenn.envd.filesystem.disconnect import watch_disconnects
from wrenn.envd.filesystem.service import FilesystemService
from wrenn.envd.ports import PortSubsystem
from wrenn.envd.process.service import ProcessService
from wrenn.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from wrenn.gen.process.process_connect import ProcessASGIApplication

_log = log.get(__name__)

#: Largest Connect request message envd reads (stdin chunks, paths); larger is resource_exhausted.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class Envd:
    """Everything one envd process owns; handlers reach it as ``request.app.state.envd``."""

    settings: EnvdSettings
    defaults: Defaults
    conns: ConnTracker
    ports: PortSubsystem
    cgroups: Cgroups | None
    processes: ProcessService
    filesystem: FilesystemService
    #: Whether Firecracker's MMDS answered at start; /init reads it again after a restore.
    mmds_present: bool = False


async def health(request: Request) -> Response:
    return Response(status_code=204)


async def _reject_unauthenticated(scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(Unauthenticated("missing or invalid X-Access-Token"))(scope, receive, send)


def build(settings: EnvdSettings, conns: ConnTracker | None = None) -> ASGIApp:
    """Compose the envd application. ``conns`` is the tracker fed by the HTTP server's
    connection lifecycle (see ``conntrack``); a fresh one is made when not given."""
    defaults = Defaults(user=settings.default_user, workdir=settings.default_workdir)
    cgroups = Cgroups.setup(settings) if settings.cgroups else None
    if cgroups is None:
        _log.warning("cgroups.disabled", reason="not enabled or not available")
    envd = Envd(
        settings=settings,
        defaults=defaults,
        conns=conns if conns is not None else ConnTracker(),
        ports=PortSubsystem(settings),
        cgroups=cgroups,
        processes=ProcessService(defaults, settings, cgroups),
        filesystem=FilesystemService(defaults),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metadata = await mmds.read(settings)
        if metadata is not None:
            envd.mmds_present = True
            mmds.apply(metadata, defaults)
        if settings.ports:
            await envd.ports.start()
        _log.info("envd.started", port=settings.port)
        try:
            yield
        finally:
            await envd.ports.stop()
            await envd.processes.aclose()
            if envd.cgroups is not None:
                await envd.cgroups.aclose()
            await envd.filesystem.aclose()
            _log.info("envd.stopped")

    http = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/init", init.post_init, methods=["POST"]),
            Route("/envs", init.get_envs, methods=["GET"]),
            Route("/files", files.download, methods=["GET"]),
            Route("/files", files.upload, methods=["POST"]),
            Route("/metrics", metrics.get_metrics, methods=["GET"]),
            Route("/snapshot/prepare", snapshot.prepare, methods=["POST"]),
        ],
        # WrennError is answered by the exception middleware; the ``Exception`` entry (server
        # error middleware) logs once and re-raises to the server.
        exception_handlers={WrennError: http_error_handler, Exception: http_error_handler},
        lifespan=lifespan,
    )
    http.state.envd = envd
    interceptors = [ErrorInterceptor()]
    process_app = ProcessASGIApplication(
        envd.processes, interceptors=interceptors, read_max_bytes=MAX_MESSAGE_BYTES
    )
    filesystem_app = watch_disconnects(
        FilesystemASGIApplication(
            envd.filesystem, interceptors=interceptors, read_max_bytes=MAX_MESSAGE_BYTES
        )
    )

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if path.startswith("/process.Process/"):
            await process_app(scope, receive, send)
        elif path.startswith("/filesystem.Filesystem/"):
            await filesystem_app(scope, receive, send)
        else:
            await http(scope, receive, send)

    return AccessTokenMiddleware(dispatch, defaults, _reject_unauthenticated)
