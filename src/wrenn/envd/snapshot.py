"""snapshot (stub)."""

from starlette.requests import Request
from starlette.responses import Response


async def prepare(request: Request) -> Response:
    return Response(status_code=501)
