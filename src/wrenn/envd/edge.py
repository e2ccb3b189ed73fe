"""The one place where errors become wire responses: Connect errors for RPCs, JSON bodies
``{"code", "message"}`` with the mapped HTTP status for plain HTTP endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wrenn import log
from wrenn.core.errors import Internal, WrennError

_log = log.get(__name__)
REQ = TypeVar("REQ")
RES = TypeVar("RES")


def to_connect(err: WrennError) -> ConnectError:
    return ConnectError(ConnectCode(err.code.value), err.message)


def _map(exc: BaseException, ctx: RequestContext[Any, Any]) -> BaseException:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, WrennError):
        return to_connect(exc)
    if isinstance(exc, Exception):
        _log.error("rpc.failed", method=ctx.method.name, exc_info=exc)
        return ConnectError(ConnectCode.INTERNAL, "internal error")
    return exc


class ErrorInterceptor:
    """Maps Wrenn errors to Connect errors; anything unexpected is logged once and becomes
    ``internal`` without a traceback reaching the client."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise _map(exc, ctx) from exc

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], Awaitable[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise _map(exc, ctx) from exc

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
            raise _map(exc, ctx) from exc


def error_response(err: WrennError) -> Response:
    return JSONResponse(err.to_body(), status_code=err.http_status)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette handler for every exception raised by an HTTP endpoint.

    Unexpected exceptions are not logged here: Starlette's server-error middleware re-raises
    them after this response is sent, and the server logs the traceback once."""
    if isinstance(exc, WrennError):
        return error_response(exc)
    return error_response(Internal("internal error"))
