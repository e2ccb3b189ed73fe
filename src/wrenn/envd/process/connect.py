"""process.Process/Connect: attach to a process by pid or tag and stream its events from
now on (a finished process still kept answers with its start and end events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from connectrpc.request import RequestContext

from wrenn.envd.process import events
from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import ConnectRequest, ConnectResponse


async def connect(
    registry: Registry,
    request: ConnectRequest,
    ctx: RequestContext[ConnectRequest, ConnectResponse],
) -> AsyncIterator[ConnectResponse]:
    handle = registry.find(request.process, running=False)
    sub = handle.subscribe()
    try:
        yield ConnectResponse(event=events.start_event(handle.pid))
        keepalive_s = events.keepalive_interval_s(ctx.request_headers)
        async for event in events.follow(sub, keepalive_s):
            yield ConnectResponse(event=event)
    finally:
        sub.close()
