"""init (stub)."""

from starlette.requests import Request
from starlette.responses import Response


async def post_init(request: Request) -> Response:
    return Response(status_code=501)


async def get_envs(request: Request) -> Response:
    return Response(status_code=501)
