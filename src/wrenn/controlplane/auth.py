"""Who a request is: a team through its API key (``X-API-Key``, or ``Authorization: Bearer``
as some SDK paths send it), an admin team, or a host through its secret."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from wrenn.controlplane.context import ServerContext, current
from wrenn.controlplane.db.records import Host, Principal
from wrenn.core.errors import PermissionDenied, Unauthenticated

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


async def principal(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    secret = api_key or (bearer.credentials if bearer else None)
    if not secret:
        raise Unauthenticated("missing API key: send it in the X-API-Key header")
    cp = current(request)
    found = cp.keys.get(secret)
    if found is None:
        async with cp.db.transaction() as tx:
            found = await tx.teams.authenticate(secret)
        if found is None:
            raise Unauthenticated("invalid or revoked API key")
        cp.keys.put(secret, found)
    request.state.principal = found  # read by the audit middleware
    return found


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.team.is_admin:
        raise PermissionDenied("this needs an API key of an admin team")
    return who


async def host(
    host_id: str,
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Host:
    if bearer is None:
        raise Unauthenticated("missing host secret: send it as Authorization: Bearer")
    cp = current(request)
    async with cp.db.transaction() as tx:
        found = await tx.hosts.authenticate(host_id, bearer.credentials)
    if found is None:
        raise Unauthenticated("invalid host id or secret")
    request.state.host = found  # read by the audit middleware
    return found


async def _context(request: Request) -> ServerContext:
    # A coroutine on purpose: FastAPI runs a plain-function dependency on its thread pool,
    # a thread hop per request for a dictionary lookup.
    return current(request)


Team = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
HostAuth = Annotated[Host, Depends(host)]
CP = Annotated[ServerContext, Depends(_context)]
