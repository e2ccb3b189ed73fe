"""Where Wrenn errors meet the wire, shared by every Connect server (envd, host agent): an
interceptor that turns ``WrennError`` into Connect errors and anything unexpected into
``internal`` (logged once, no traceback to the client), and the JSON body plain HTTP
endpoints answer with."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.responses import JSONResponse, Response

from wrenn.core.errors import WrennError

_log = structlog.get_logger(__name__)
REQ = TypeVar("REQ")
RES = TypeVar("RES")


def to_connect(err: WrennError) -> ConnectError:
    return ConnectError(ConnectCode(err.code.value), err.message)


def error_response(err: WrennError) -> Response:
    """``{"code", "message"}`` with the error's HTTP status."""
    return JSONResponse(err.to_body(), status_code=err.http_status)


class ErrorInterceptor:
    """Maps Wrenn errors to Connect errors; anything unexpected is logged once and becomes
    ``internal`` without a traceback reaching the client. With ``log_errors`` the expected
    errors are logged at info level too."""

    def __init__(self, *, log_errors: bool = False) -> None:
        self.log_errors = log_errors

    def _map(self, exc: Exception, ctx: RequestContext[Any, Any]) -> Exception:
        if isinstance(exc, ConnectError):
            return exc
        if isinstance(exc, WrennError):
            if self.log_errors:
                _log.info(
                    "rpc.error", method=ctx.method.name, code=exc.code.value, error=exc.message
                )
            return to_connect(exc)
        _log.error("rpc.failed", method=ctx.method.name, exc_info=exc)
        return ConnectError(ConnectCode.INTERNAL, "internal error")

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise self._map(exc, ctx) from exc

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], Awaitable[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise self._map(exc, ctx) from exc

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        try:
            async for item in call_next(request, ctx):
                yield item
        except Exception as exc:
            raise self._map(exc, ctx) from exc
