"""The one place errors become HTTP responses: body ``{"code", "message"}`` with the Connect
code of the error, status from the error (``wrenn.core.errors`` table, refined in
``controlplane.errors``). Framework errors (bad request bodies, unknown routes) get the same
shape; anything unexpected is a logged 500 with no detail."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wrenn import log
from wrenn.core.errors import HTTP_STATUS, Code, WrennError

_log = log.get(__name__)

_CODE_BY_STATUS: dict[int, Code] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    405: Code.UNIMPLEMENTED,
    409: Code.ALREADY_EXISTS,
    413: Code.RESOURCE_EXHAUSTED,
    415: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    503: Code.UNAVAILABLE,
}


def _body(code: Code, message: str) -> dict[str, str]:
    return {"code": code.value, "message": message}


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(exc: RequestValidationError) -> str:
    """The first problem, naming the field and the value that was given."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    where = loc[0] if loc else "request"
    field = ".".join(loc[1:]) or where
    message = f"{field}: {first.get('msg', 'invalid')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {_short(first['input'])})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more"
    return message


async def _wrenn_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WrennError)
    status = exc.http_status
    if status >= 500:
        _log.warning(
            "request.failed", path=request.url.path, code=exc.code.value, message=exc.message
        )
    return JSONResponse(exc.to_body(), status_code=status)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        _body(Code.INVALID_ARGUMENT, validation_message(exc)),
        status_code=HTTP_STATUS[Code.INVALID_ARGUMENT],
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_STATUS.get(exc.status_code, Code.UNKNOWN)
    return JSONResponse(
        _body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _log.error("request.crashed", path=request.url.path, exc_info=exc)
    return JSONResponse(_body(Code.INTERNAL, "internal error"), status_code=500)


class RejectNul:
    """NUL is valid in no path segment or query value (and PostgreSQL text refuses it), so a
    request carrying one is refused here, before any handler sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query: bytes = scope.get("query_string", b"")
            if "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query:
                response = JSONResponse(
                    _body(Code.INVALID_ARGUMENT, "NUL characters are not allowed in URLs"),
                    status_code=HTTP_STATUS[Code.INVALID_ARGUMENT],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestId:
    """Binds ``request_id`` (the client's ``X-Request-Id`` or a fresh one) to every log line of
    the request and returns it in the response's ``X-Request-Id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"")
        request_id = given.decode("latin-1")[:64] if given else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)


def install(app: FastAPI) -> None:
    app.add_exception_handler(WrennError, _wrenn_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(RejectNul)
    app.add_middleware(RequestId)
