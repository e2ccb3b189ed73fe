"""The event stream shared by Start and Connect: start, output, keepalives, end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Literal, TypeAlias

from protobuf import Oneof

from wrenn.envd.process.fanout import Chunk, ExitStatus, Subscriber
from wrenn.gen.process.process_pb import ProcessEvent

#: Header in which the client asks for keepalives every N seconds while output is idle.
KEEPALIVE_HEADER = "keepalive-ping-interval"
DEFAULT_KEEPALIVE_S = 90.0
MIN_KEEPALIVE_S = 1.0


def keepalive_interval_s(headers: Mapping[str, str]) -> float:
    try:
        seconds = float(headers.get(KEEPALIVE_HEADER, ""))
    except ValueError:
        return DEFAULT_KEEPALIVE_S
    if not seconds > 0 or seconds == float("inf"):
        return DEFAULT_KEEPALIVE_S
    return max(seconds, MIN_KEEPALIVE_S)


_Output: TypeAlias = (
    Oneof[Literal["stdout"], bytes] | Oneof[Literal["stderr"], bytes] | Oneof[Literal["pty"], bytes]
)


def start_event(pid: int) -> ProcessEvent:
    start: Oneof[Literal["start"], ProcessEvent.StartEvent] = Oneof(
        "start", ProcessEvent.StartEvent(pid=pid)
    )
    return ProcessEvent(event=start)


def keepalive_event() -> ProcessEvent:
    keepalive: Oneof[Literal["keepalive"], ProcessEvent.KeepAlive] = Oneof(
        "keepalive", ProcessEvent.KeepAlive()
    )
    return ProcessEvent(event=keepalive)


def end_event(status: ExitStatus) -> ProcessEvent:
    end: Oneof[Literal["end"], ProcessEvent.EndEvent] = Oneof(
        "end",
        ProcessEvent.EndEvent(
            exit_code=status.exit_code,
            exited=status.exited,
            status=status.status,
            error=status.error,
        ),
    )
    return ProcessEvent(event=end)


def data_event(chunk: Chunk) -> ProcessEvent:
    output: _Output
    if chunk.kind == "stdout":
        stdout: Oneof[Literal["stdout"], bytes] = Oneof("stdout", chunk.data)
        output = stdout
    elif chunk.kind == "stderr":
        stderr: Oneof[Literal["stderr"], bytes] = Oneof("stderr", chunk.data)
        output = stderr
    else:
        pty: Oneof[Literal["pty"], bytes] = Oneof("pty", chunk.data)
        output = pty
    data: Oneof[Literal["data"], ProcessEvent.DataEvent] = Oneof(
        "data", ProcessEvent.DataEvent(output=output)
    )
    return ProcessEvent(event=data)


async def follow(sub: Subscriber, keepalive_s: float) -> AsyncIterator[ProcessEvent]:
    """Output events, a keepalive whenever none came for ``keepalive_s``, and finally the
    end event. The subscription is closed however the iteration stops."""
    try:
        while True:
            item = await sub.get(keepalive_s)
            if item is None:
                yield keepalive_event()
            elif isinstance(item, Chunk):
                yield data_event(item)
            else:
                yield end_event(item)
                return
    finally:
        sub.close()
