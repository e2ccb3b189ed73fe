"""process.Process: the Connect service envd exposes for running processes. Each RPC lives
in its own module; this class only dispatches to them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from connectrpc.request import RequestContext

from wrenn.envd.cgroups import Cgroups
from wrenn.envd.config import EnvdSettings
from wrenn.envd.defaults import Defaults
from wrenn.envd.process import close_stdin, connect, send_input, send_signal, start, update
from wrenn.envd.process.list import list_processes
from wrenn.envd.process.registry import Registry
from wrenn.envd.process.spawn import Spawner
from wrenn.envd.process.stream_input import stream_input
from wrenn.gen.process.process_connect import Process
from wrenn.gen.process.process_pb import (
    CloseStdinRequest,
    CloseStdinResponse,
    ConnectRequest,
    ConnectResponse,
    ListRequest,
    ListResponse,
    SendInputRequest,
    SendInputResponse,
    SendSignalRequest,
    SendSignalResponse,
    StartRequest,
    StartResponse,
    StreamInputRequest,
    StreamInputResponse,
    UpdateRequest,
    UpdateResponse,
)


class ProcessService(Process):
    def __init__(self, defaults: Defaults, settings: EnvdSettings, cgroups: Cgroups | None) -> None:
        self.defaults = defaults
        self.registry = Registry(
            Spawner(cgroups.child_fds() if cgroups is not None else (), fast=settings.fast_spawn)
        )

    async def list(
        self, request: ListRequest, ctx: RequestContext[ListRequest, ListResponse]
    ) -> ListResponse:
        return list_processes(self.registry, request)

    def connect(
        self, request: ConnectRequest, ctx: RequestContext[ConnectRequest, ConnectResponse]
    ) -> AsyncIterator[ConnectResponse]:
        return connect.connect(self.registry, request, ctx)

    def start(
        self, request: StartRequest, ctx: RequestContext[StartRequest, StartResponse]
    ) -> AsyncIterator[StartResponse]:
        return start.start(self.registry, self.defaults, request, ctx)

    async def update(
        self, request: UpdateRequest, ctx: RequestContext[UpdateRequest, UpdateResponse]
    ) -> UpdateResponse:
        return update.update(self.registry, request)

    async def stream_input(
        self,
        request: AsyncIterator[StreamInputRequest],
        ctx: RequestContext[StreamInputRequest, StreamInputResponse],
    ) -> StreamInputResponse:
        return await stream_input(self.registry, request)

    async def send_input(
        self, request: SendInputRequest, ctx: RequestContext[SendInputRequest, SendInputResponse]
    ) -> SendInputResponse:
        return await send_input.send_input(self.registry, request)

    async def send_signal(
        self,
        request: SendSignalRequest,
        ctx: RequestContext[SendSignalRequest, SendSignalResponse],
    ) -> SendSignalResponse:
        return send_signal.send_signal(self.registry, request)

    async def close_stdin(
        self,
        request: CloseStdinRequest,
        ctx: RequestContext[CloseStdinRequest, CloseStdinResponse],
    ) -> CloseStdinResponse:
        return close_stdin.close_stdin(self.registry, request)

    async def aclose(self) -> None:
        """Kill every process this service started and wait for them to end."""
        await self.registry.aclose()
