"""Access-token enforcement and the identity a request acts as.

Once /init has set an access token, every endpoint except ``GET /health`` requires the
``X-Access-Token`` header, compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from wrenn.core.errors import InvalidArgument
from wrenn.envd import users
from wrenn.envd.defaults import Defaults

TOKEN_HEADER = b"x-access-token"
OPEN_PATHS = frozenset({"/health"})


def token_matches(expected: str | None, presented: str | None) -> bool:
    if expected is None:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


class AccessTokenMiddleware:
    """Rejects requests without the right token before any handler runs."""

    def __init__(self, app: ASGIApp, defaults: Defaults, reject: ASGIApp) -> None:
        self.app = app
        self.defaults = defaults
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = None
        for name, value in scope["headers"]:
            if name == TOKEN_HEADER:
                presented = value.decode("latin-1")
                break
        if not token_matches(self.defaults.access_token, presented):
            await self.reject(scope, receive, send)
            return
        await self.app(scope, receive, send)


def username_from_basic(authorization: str | None) -> str | None:
    """The user named by an ``Authorization: Basic base64(user:)`` header, as the SDK sends."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("malformed Authorization header") from None
    name = decoded.partition(":")[0]
    return name or None


def request_user(headers: Mapping[str, str], defaults: Defaults) -> users.User:
    """The user a Connect request acts as: its Basic auth user, else the default user."""
    name = username_from_basic(headers.get("authorization")) or defaults.user
    return users.lookup(name)
