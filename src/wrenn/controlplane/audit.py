"""The audit trail: who changed what, when, and how it ended.

Every state-changing call (POST, PUT, PATCH, DELETE on a route of the API, extensions'
included) is recorded by one ASGI middleware, ``AuditMiddleware``; routes contain no audit
code. What it records:

- ``actor``: the API key id (``key_…``) or host id (``host_…``) the request authenticated as,
  ``None`` when it did not (a failed authentication is recorded too);
- ``team``: the team of that key;
- ``action``: ``<route tag>.<route name>``, e.g. ``sandboxes.pause``, ``channels.create_channel``;
- ``target``: the route's last path parameter, else the id a create returned (``sandboxID``,
  ``channelID``, …);
- ``result``: ``ok`` for a success, else the error code of the response (``not_found``, …);
- ``details``: method, path, HTTP status and request id.

The row is written before the last byte of the response leaves, so a client that got its
answer finds its call in ``GET /v1/audit``. Heartbeats are not recorded (one per host every
few seconds would drown the rest). Changes the control plane makes on its own (end of a
timeout, reconciliation) are recorded through ``Audit.record`` with actor ``system``.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wrenn import log
from wrenn.controlplane.db import Database

_log = log.get(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Routine calls left out of the trail.
QUIET_ACTIONS = frozenset({"hosts.heartbeat"})
#: Response ids a create returns, in the order they name its target.
_ID_FIELDS = ("sandboxID", "snapshotID", "channelID", "keyID", "hostID", "teamID", "id")
#: Response bytes kept to find the target and the error code.
_BODY_LIMIT = 64 * 1024
SYSTEM = "system"


class Audit:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(
        self,
        *,
        action: str,
        target_type: str,
        target_id: str,
        result: str = "ok",
        team_id: str | None = None,
        actor: str | None = SYSTEM,
        details: dict[str, Any] | None = None,
    ) -> None:
        """One entry, in its own transaction. Failing to write it is logged, never raised:
        the change it describes has already happened."""
        try:
            async with self._db.transaction() as tx:
                await tx.audit.record(
                    action=action,
                    target_type=target_type,
                    target_id=target_id,
                    result=result,
                    team_id=team_id,
                    actor=actor,
                    details=details,
                )
        except Exception:
            _log.exception("audit.write_failed", action=action, target_id=target_id)


def _action(route: Any) -> tuple[str, str]:
    tags = getattr(route, "tags", None) or ["api"]
    tag = str(tags[0])
    name = str(getattr(route, "name", "") or "call")
    return f"{tag}.{name}", tag


def _target(path_params: dict[str, Any], body: bytes, content_type: str) -> str:
    if path_params:
        return str(list(path_params.values())[-1])
    if not body or "json" not in content_type:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        for key in _ID_FIELDS:
            if isinstance(data.get(key), str):
                return str(data[key])
    return ""


def _result(status: int, body: bytes, content_type: str) -> str:
    if status < 400:
        return "ok"
    if "json" in content_type:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("code"), str):
            return str(data["code"])
    return str(status)


class AuditMiddleware:
    """Records every state-changing request that reached a route (see the module docstring)."""

    def __init__(self, app: ASGIApp, audit: Audit) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 0
        content_type = ""
        body = bytearray()
        recorded = False

        async def record(result: str | None = None) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            if route is None:
                return  # no route matched: an unknown path is nobody's state
            action, target_type = _action(route)
            if action in QUIET_ACTIONS:
                return
            principal = state.get("principal")
            host = state.get("host")
            actor = principal.key_id if principal else (host.id if host else None)
            await self.audit.record(
                action=action,
                target_type=target_type,
                target_id=_target(scope.get("path_params") or {}, bytes(body), content_type),
                result=result or _result(status, bytes(body), content_type),
                team_id=principal.team.id if principal else None,
                actor=actor,
                details={
                    "method": scope["method"],
                    "path": scope["path"][:512],
                    "status": status,
                    "requestId": structlog.contextvars.get_contextvars().get("request_id"),
                },
            )

        async def send_audited(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for key, value in message.get("headers", []):
                    if key.lower() == b"content-type":
                        content_type = value.decode("latin-1").lower()
            elif message["type"] == "http.response.body":
                if len(body) < _BODY_LIMIT:
                    body.extend(message.get("body", b"")[: _BODY_LIMIT - len(body)])
                if not message.get("more_body", False):
                    await record()
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            status = status or 500
            await record("internal")
            raise
