"""/v1/channels: a team's webhook channels (URL, event filter, signing secret shown once) and
the deliveries made to them. See ``wrenn.controlplane.webhooks`` for how they are signed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.db.records import Channel, Delivery
from wrenn.controlplane.schemas import wrenn as api
from wrenn.core.errors import NotFound

router = APIRouter(prefix="/v1/channels", tags=["channels"])


def channel_out(c: Channel) -> api.ChannelOut:
    return api.ChannelOut(
        channel_id=c.id,
        team_id=c.team_id,
        name=c.name,
        url=c.url,
        events=c.events,
        enabled=c.enabled,
        created_at=c.created_at,
        updated_at=c.updated_at,
    )


def delivery_out(d: Delivery) -> api.DeliveryOut:
    return api.DeliveryOut(
        delivery_id=d.id,
        event_id=d.event_id,
        event_type=d.event_type,
        status=d.status.value,
        attempts=d.attempts,
        last_status=d.last_status,
        last_error=d.last_error,
        next_attempt_at=d.next_attempt_at,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )


def _not_found(channel_id: str) -> NotFound:
    return NotFound(f"channel {channel_id[:64]!r} not found")


@router.post("", status_code=201)
async def create_channel(body: api.NewChannel, cp: CP, who: Team) -> api.CreatedChannel:
    """A new channel; its signing ``secret`` is in this response only."""
    async with cp.db.transaction() as tx:
        channel, secret = await tx.channels.create(
            who.team.id, name=body.name, url=body.url, events=list(body.events)
        )
    return api.CreatedChannel(**channel_out(channel).model_dump(), secret=secret)


@router.get("")
async def list_channels(cp: CP, who: Team) -> list[api.ChannelOut]:
    async with cp.db.transaction() as tx:
        channels = await tx.channels.of_team(who.team.id)
    return [channel_out(c) for c in channels]


@router.get("/{channel_id}")
async def get_channel(channel_id: str, cp: CP, who: Team) -> api.ChannelOut:
    async with cp.db.transaction() as tx:
        channel = await tx.channels.get(who.team.id, channel_id)
    if channel is None:
        raise _not_found(channel_id)
    return channel_out(channel)


@router.patch("/{channel_id}")
async def update_channel(
    channel_id: str, body: api.ChannelUpdate, cp: CP, who: Team
) -> api.ChannelOut:
    """Change the URL, name, event filter or ``enabled``; what is left out stays."""
    async with cp.db.transaction() as tx:
        channel = await tx.channels.update(
            who.team.id,
            channel_id,
            name=body.name,
            url=body.url,
            events=list(body.events) if body.events is not None else None,
            enabled=body.enabled,
        )
    if channel is None:
        raise _not_found(channel_id)
    return channel_out(channel)


@router.delete("/{channel_id}", status_code=204)
async def delete_channel(channel_id: str, cp: CP, who: Team) -> Response:
    """Deletes the channel and its deliveries, pending ones included."""
    async with cp.db.transaction() as tx:
        deleted = await tx.channels.delete(who.team.id, channel_id)
    if not deleted:
        raise _not_found(channel_id)
    return Response(status_code=204)


@router.get("/{channel_id}/deliveries")
async def list_deliveries(
    channel_id: str,
    cp: CP,
    who: Team,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[api.DeliveryOut]:
    """The channel's latest deliveries, newest first, with their attempts and last answer."""
    async with cp.db.transaction() as tx:
        channel = await tx.channels.get(who.team.id, channel_id)
        if channel is None:
            raise _not_found(channel_id)
        deliveries = await tx.deliveries.of_channel(channel.id, limit)
    return [delivery_out(d) for d in deliveries]
