"""Webhook delivery: a worker in the app's TaskGroup POSTs queued events to their channels.

Each request carries

    Content-Type:     application/json
    Wrenn-Event:      sandbox.created
    Wrenn-Delivery:   <delivery id>      (the same on every retry of one delivery)
    Wrenn-Signature:  t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body with the channel's
secret, compares in constant time and rejects old timestamps (replays).

A 2xx answer delivers. Anything else (another status, a redirect, no answer within
``webhook_timeout_s``) is retried after ``base * 2 ** (attempts - 1)`` seconds, at most ``cap``,
until ``webhook_max_attempts`` attempts were made; then the delivery is ``failed``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from wrenn import log
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.records import Delivery, DeliveryStatus
from wrenn.controlplane.events import Events

_log = log.get(__name__)

SIGNATURE_HEADER = "Wrenn-Signature"
EVENT_HEADER = "Wrenn-Event"
DELIVERY_HEADER = "Wrenn-Delivery"
#: Deliveries claimed per round, and sent at once.
BATCH = 50
CONCURRENCY = 8


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Wrenn-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s``."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    cap_s: float

    def delay(self, attempts: int) -> timedelta:
        """Wait before the next attempt, after ``attempts`` failed ones (≥ 1)."""
        return timedelta(seconds=min(self.base_s * 2 ** (attempts - 1), self.cap_s))


class WebhookWorker:
    def __init__(
        self,
        db: Database,
        events: Events,
        policy: RetryPolicy,
        *,
        timeout_s: float,
        poll_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._db = db
        self._events = events
        self._policy = policy
        self._poll_s = poll_s
        self._lease = timedelta(seconds=timeout_s * 2 + 5)
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": "wrenn-controlplane"},
        )

    async def run(self) -> None:
        try:
            while True:
                self._events.wake.clear()
                try:
                    sent = await self.tick()
                except Exception:
                    # Task boundary: a failed round (database away, ...) must not end the worker.
                    _log.exception("webhooks.tick_failed")
                    sent = 0
                if sent < BATCH:
                    # Nothing more due now: sleep until woken by a new event or the next poll
                    # (which picks up retries coming due).
                    try:
                        async with asyncio.timeout(self._poll_s):
                            await self._events.wake.wait()
                    except TimeoutError:
                        pass
        finally:
            await self._client.aclose()

    async def tick(self) -> int:
        """Send the deliveries due now; how many were attempted."""
        now = datetime.now(UTC)
        async with self._db.transaction() as tx:
            due = await tx.deliveries.claim_due(now, self._lease, BATCH)
        if due:
            async with asyncio.TaskGroup() as tg:
                for delivery in due:
                    tg.create_task(self._attempt(delivery))
        return len(due)

    async def _target(self, channel_id: str) -> tuple[str, str] | None:
        async with self._db.transaction() as tx:
            secret = await tx.channels.signing_secret(channel_id)
            channel = await tx.channels.by_id(channel_id)
        if secret is None or channel is None or not channel.enabled:
            return None
        return channel.url, secret

    async def _attempt(self, delivery: Delivery) -> None:
        async with self._limit:
            target = await self._target(delivery.channel_id)
            if target is None:
                await self._record(delivery, None, "channel disabled or deleted", final=True)
                return
            url, secret = target
            body = json.dumps(delivery.payload, separators=(",", ":")).encode()
            headers: Mapping[str, str] = {
                "Content-Type": "application/json",
                EVENT_HEADER: delivery.event_type,
                DELIVERY_HEADER: str(delivery.id),
                SIGNATURE_HEADER: sign(secret, int(time.time()), body),
            }
            status: int | None = None
            error: str | None = None
            try:
                resp = await self._client.post(url, content=body, headers=headers)
                status = resp.status_code
                if not resp.is_success:
                    error = f"HTTP {status}"
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            await self._record(delivery, status, error, final=False)

    async def _record(
        self, delivery: Delivery, status: int | None, error: str | None, *, final: bool
    ) -> None:
        now = datetime.now(UTC)
        attempts = delivery.attempts + 1
        next_at: datetime | None = None
        if error is None:
            outcome = DeliveryStatus.DELIVERED
        elif final or attempts >= self._policy.max_attempts:
            outcome = DeliveryStatus.FAILED
        else:
            outcome = DeliveryStatus.PENDING
            next_at = now + self._policy.delay(attempts)
        async with self._db.transaction() as tx:
            await tx.deliveries.record_attempt(
                delivery.id,
                status=outcome,
                http_status=status,
                error=error,
                now=now,
                next_attempt_at=next_at,
            )
        _log.info(
            "webhook.attempt",
            delivery_id=delivery.id,
            channel_id=delivery.channel_id,
            event_type=delivery.event_type,
            attempt=attempts,
            status=status,
            outcome=outcome.value,
            error=error,
        )
