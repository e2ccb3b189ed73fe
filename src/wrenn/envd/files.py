"""files (stub)."""

from starlette.requests import Request
from starlette.responses import Response


async def download(request: Request) -> Response:
    return Response(status_code=501)


async def upload(request: Request) -> Response:
    return Response(status_code=501)
