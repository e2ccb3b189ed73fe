"""Idempotent creates: ``Idempotency-Key`` on ``POST /sandboxes``, ``POST /v2/sandboxes`` and
``POST /v1/snapshots``.

A client that retries a create (a timeout, a dropped connection) with the same key gets the
first request's response instead of a second sandbox. Keys are per team and remembered for
``idempotency_ttl_s`` (24 h by default). A request carrying a key:

1. claims the key in the database together with its fingerprint (method, path, body); the
   claim is committed before any work starts, so it is visible to every replica;
2. if it got the claim, it does the work; success stores the response with the key, failure
   releases the key (a retry then tries again);
3. if another request holds the key: a different fingerprint is ``Conflict`` (409); a stored
   response is replayed (same status and body, header ``Idempotent-Replayed: true``); a claim
   still in progress is waited for, then replayed — so concurrent duplicates make one sandbox.

A claim left in progress for longer than a create can take (its server died) is taken over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from wrenn import log
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.db import Database
from wrenn.controlplane.errors import Conflict
from wrenn.core.errors import InvalidArgument

_log = log.get(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
#: Visible ASCII, as in an HTTP header value meant to be compared byte for byte.
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
#: How often a request waiting on a duplicate in progress looks again.
_POLL_S = 0.05
_POLL_MAX_S = 0.5


#: The header as a route parameter.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=HEADER,
        max_length=MAX_KEY_LENGTH,
        description="A retry with the same key (per team, for 24 h) returns the first result",
    ),
]


@dataclass(frozen=True)
class Outcome:
    """What a create answered: its status and JSON body."""

    status_code: int
    body: dict[str, Any]

    def response(self, *, replayed: bool = False) -> JSONResponse:
        headers = {REPLAYED_HEADER: "true"} if replayed else None
        return JSONResponse(self.body, status_code=self.status_code, headers=headers)


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise InvalidArgument(
            f"{HEADER}: 1 to {MAX_KEY_LENGTH} visible ASCII characters (got {key[:64]!r})"
        )
    return key


def fingerprint(method: str, path: str, body: BaseModel | None) -> str:
    """SHA-256 over what makes two requests the same request."""
    payload = body.model_dump(mode="json", by_alias=True, exclude_unset=True) if body else None
    canonical = json.dumps(
        [method.upper(), path, payload], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Idempotency:
    def __init__(self, db: Database, *, ttl_s: float, in_progress_s: float) -> None:
        """``in_progress_s``: the longest a create may take; a duplicate waits that long, and
        a claim older than that with no response is taken over."""
        self._db = db
        self._ttl = timedelta(seconds=ttl_s)
        self._in_progress = timedelta(seconds=in_progress_s)

    @classmethod
    def of(cls, db: Database, settings: ControlPlaneSettings) -> Idempotency:
        """As configured: keys kept ``idempotency_ttl_s``; a create may take as long as one
        agent call, plus a minute for the rest of it."""
        return cls(
            db, ttl_s=settings.idempotency_ttl_s, in_progress_s=settings.agent_timeout_s + 60
        )

    async def once(
        self,
        team_id: str,
        key: str | None,
        request_fingerprint: str,
        work: Callable[[], Awaitable[Outcome]],
    ) -> JSONResponse:
        """``work``'s response, or, for a key used before, the first response made with it."""
        if key is None:
            return (await work()).response()
        check_key(key)
        deadline = datetime.now(UTC) + self._in_progress
        delay = _POLL_S
        while True:
            now = datetime.now(UTC)
            async with self._db.transaction() as tx:
                held = await tx.idempotency.claim(
                    team_id, key, request_fingerprint, now, self._ttl, now - self._in_progress
                )
                await tx.idempotency.prune(now)
            if held is None:
                return (await self._serve(team_id, key, work)).response()
            if held.fingerprint != request_fingerprint:
                raise Conflict(
                    f"{HEADER} {key[:64]!r} was already used with a different request "
                    f"(at {held.created_at.isoformat()}); use a new key for a new request"
                )
            if held.status_code is not None:
                outcome = Outcome(held.status_code, held.response or {})
                return outcome.response(replayed=True)
            if now >= deadline:
                raise Conflict(
                    f"a request with {HEADER} {key[:64]!r} is still in progress; retry later"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    async def _serve(
        self, team_id: str, key: str, work: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        try:
            outcome = await work()
        except BaseException:
            await asyncio.shield(self._release(team_id, key))
            raise
        await asyncio.shield(self._complete(team_id, key, outcome))
        return outcome

    async def _complete(self, team_id: str, key: str, outcome: Outcome) -> None:
        async with self._db.transaction() as tx:
            await tx.idempotency.complete(team_id, key, outcome.status_code, outcome.body)

    async def _release(self, team_id: str, key: str) -> None:
        try:
            async with self._db.transaction() as tx:
                await tx.idempotency.release(team_id, key)
        except Exception:
            # The claim then lapses as abandoned; a retry waits for that.
            _log.exception("idempotency.release_failed", team_id=team_id)
