"""metrics (stub)."""

from starlette.requests import Request
from starlette.responses import Response


async def get_metrics(request: Request) -> Response:
    return Response(status_code=501)
