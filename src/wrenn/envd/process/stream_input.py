"""process.Process/StreamInput: a client stream that opens with the process to write to,
then carries input chunks (and keepalives) in order."""

from __future__ import annotations

from collections.abc import AsyncIterator

from protobuf import Oneof

from wrenn.core.errors import InvalidArgument
from wrenn.envd.process.handle import ProcessHandle
from wrenn.envd.process.registry import Registry
from wrenn.envd.process.send_input import deliver
from wrenn.gen.process.process_pb import StreamInputRequest, StreamInputResponse


async def stream_input(
    registry: Registry, requests: AsyncIterator[StreamInputRequest]
) -> StreamInputResponse:
    handle: ProcessHandle | None = None
    async for request in requests:
        match request.event:
            case Oneof(field="start", value=StreamInputRequest.StartEvent() as start):
                if handle is not None:
                    raise InvalidArgument("input stream has more than one start event")
                handle = registry.find(start.process)
            case Oneof(field="data", value=StreamInputRequest.DataEvent() as data):
                if handle is None:
                    raise InvalidArgument("input stream must begin with a start event")
                await deliver(handle, data.input)
            case Oneof(field="keepalive"):
                pass
            case _:
                raise InvalidArgument("input stream event must be start, data or keepalive")
    return StreamInputResponse()
