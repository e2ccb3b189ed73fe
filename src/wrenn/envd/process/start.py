"""process.Process/Start: launch a process and stream its events until it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from connectrpc.request import RequestContext

from wrenn.core.errors import InvalidArgument
from wrenn.envd.auth import request_user
from wrenn.envd.defaults import Defaults
from wrenn.envd.process import events
from wrenn.envd.process.launch import (
    LaunchSpec,
    PtySize,
    check_identity,
    environment,
    working_directory,
)
from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import StartRequest, StartResponse

#: PTY size when a request asks for a PTY without giving one.
DEFAULT_PTY_SIZE = PtySize(cols=80, rows=24)


def launch_spec(
    request: StartRequest, defaults: Defaults, headers: Mapping[str, str]
) -> LaunchSpec:
    """Validate a start request and resolve it against the requesting user."""
    config = request.process
    if config is None or not config.cmd:
        raise InvalidArgument("process.cmd must not be empty")
    if "\0" in config.cmd or any("\0" in arg for arg in config.args):
        raise InvalidArgument("process.cmd and process.args must not contain NUL bytes")
    user = request_user(headers, defaults)
    check_identity(user)
    pty: PtySize | None = None
    if request.pty is not None:
        size = request.pty.size
        pty = DEFAULT_PTY_SIZE if size is None else PtySize(cols=size.cols, rows=size.rows)
    cwd = working_directory(config.cwd if config.has_field("cwd") else None, user, defaults)
    return LaunchSpec(
        argv=(config.cmd, *config.args),
        env=environment(user, defaults, config.envs, pty=pty is not None),
        cwd=cwd,
        user=user,
        pty=pty,
        stdin=request.stdin if request.has_field("stdin") else True,
    )


async def start(
    registry: Registry,
    defaults: Defaults,
    request: StartRequest,
    ctx: RequestContext[StartRequest, StartResponse],
) -> AsyncIterator[StartResponse]:
    spec = launch_spec(request, defaults, ctx.request_headers)
    tag = request.tag if request.has_field("tag") else None
    remaining_ms = ctx.timeout_ms
    timeout_s = max(remaining_ms, 0.0) / 1000 if remaining_ms is not None else None
    assert request.process is not None
    handle, sub = await registry.launch(spec, request.process, tag, timeout_s)
    try:
        yield StartResponse(event=events.start_event(handle.pid))
        keepalive_s = events.keepalive_interval_s(ctx.request_headers)
        async for event in events.follow(sub, keepalive_s):
            yield StartResponse(event=event)
    finally:
        sub.close()
