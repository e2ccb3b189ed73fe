"""Events: what happened to sandboxes and hosts, emitted where it happens.

    sandbox.created   a sandbox is running after a create
    sandbox.paused    a pause finished (by request or at its end time with auto-pause)
    sandbox.resumed   a resume finished (by request, connect, or traffic with auto-resume)
    sandbox.killed    a kill finished (by request or at its end time)
    sandbox.failed    a create failed, or the reconciler found the sandbox lost
    host.up           a host's first heartbeat, or the first after it was down
    host.down         the reconciler found a host silent past the heartbeat window

``emit`` runs inside the transaction that makes the change (a transactional outbox): one
delivery row per subscribed channel is written with it, so an event is delivered if and only
if its change committed. After the commit the event is logged, in-process subscribers are
called and the webhook worker is woken.

Sandbox events go to the owning team's channels; host events (no team) to admin teams'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from wrenn import log
from wrenn.controlplane import ids
from wrenn.controlplane.db import Transaction
from wrenn.controlplane.db.records import Host, Sandbox

_log = log.get(__name__)


class EventType(StrEnum):
    SANDBOX_CREATED = "sandbox.created"
    SANDBOX_PAUSED = "sandbox.paused"
    SANDBOX_RESUMED = "sandbox.resumed"
    SANDBOX_KILLED = "sandbox.killed"
    SANDBOX_FAILED = "sandbox.failed"
    HOST_UP = "host.up"
    HOST_DOWN = "host.down"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Event:
    type: str
    #: The team whose channels receive it; ``None`` for host events (admin teams' channels).
    team_id: str | None
    data: dict[str, Any]
    id: str = field(default_factory=ids.event_id)
    time: datetime = field(default_factory=_now)

    def payload(self) -> dict[str, Any]:
        """The JSON body a webhook receives."""
        return {
            "id": self.id,
            "type": self.type,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "teamID": self.team_id,
            "data": self.data,
        }


def sandbox_event(kind: EventType, sandbox: Sandbox, **extra: Any) -> Event:
    data: dict[str, Any] = {
        "sandboxID": sandbox.id,
        "templateID": sandbox.template_id,
        "hostID": sandbox.host_id,
        "metadata": dict(sandbox.metadata),
    }
    data.update(extra)
    return Event(type=kind.value, team_id=sandbox.team_id, data=data)


def host_event(kind: EventType, host: Host, **extra: Any) -> Event:
    data: dict[str, Any] = {"hostID": host.id, "address": host.address}
    data.update(extra)
    return Event(type=kind.value, team_id=None, data=data)


Subscriber = Callable[[Event], None]


class Events:
    """The one place events go through. ``subscribe`` callbacks run in the event loop right
    after the commit and must not block."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        #: Set when deliveries were queued; the webhook worker waits on it.
        self.wake = asyncio.Event()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` for every committed event; returns the unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def emit(self, tx: Transaction, event: Event) -> None:
        """Queue ``event`` for its channels in ``tx``; published once ``tx`` commits."""
        channels = await tx.channels.subscribed(event.team_id, event.type)
        payload = event.payload()
        for channel in channels:
            await tx.deliveries.enqueue(
                channel.id,
                event_id=event.id,
                event_type=event.type,
                payload=payload,
                now=event.time,
            )
        tx.after_commit(lambda: self._published(event, queued=bool(channels)))

    def _published(self, event: Event, *, queued: bool) -> None:
        subject = event.data.get("sandboxID") or event.data.get("hostID")
        _log.info(event.type, event_id=event.id, subject=subject)
        if queued:
            self.wake.set()
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                # A subscriber's bug must not undo or hide an event that has committed.
                _log.exception("events.subscriber_failed", event_type=event.type)
