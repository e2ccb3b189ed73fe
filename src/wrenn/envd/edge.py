"""The one place where envd's errors become wire responses: Connect errors for RPCs (the
shared interceptor), JSON bodies ``{"code", "message"}`` with the mapped HTTP status for
plain HTTP endpoints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from wrenn.core.connect import ErrorInterceptor, error_response
from wrenn.core.errors import Internal, WrennError

__all__ = ["ErrorInterceptor", "error_response", "http_error_handler"]


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette handler for every exception raised by an HTTP endpoint.

    Unexpected exceptions are not logged here: Starlette's server-error middleware re-raises
    them after this response is sent, and the server logs the traceback once."""
    if isinstance(exc, WrennError):
        return error_response(exc)
    return error_response(Internal("internal error"))
