"""process.Process/SendInput: write one piece of input to a process's stdin or PTY."""

from __future__ import annotations

from protobuf import Oneof

from wrenn.core.errors import InvalidArgument
from wrenn.envd.process.handle import ProcessHandle
from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import ProcessInput, SendInputRequest, SendInputResponse


async def deliver(handle: ProcessHandle, data: ProcessInput | None) -> None:
    """Write ``data`` where it is addressed; shared with StreamInput."""
    match data.input if data is not None else None:
        case Oneof(field="stdin", value=payload):
            await handle.write_stdin(payload)
        case Oneof(field="pty", value=payload):
            await handle.write_pty(payload)
        case _:
            raise InvalidArgument("input must be stdin or pty data")


async def send_input(registry: Registry, request: SendInputRequest) -> SendInputResponse:
    handle = registry.find(request.process)
    await deliver(handle, request.input)
    return SendInputResponse()
