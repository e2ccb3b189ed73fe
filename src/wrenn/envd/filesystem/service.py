"""filesystem.Filesystem: one module per RPC, composed here. Every RPC acts as the user of
the request's ``Authorization: Basic`` header (else the default user): paths resolve
against that user's home and the filesystem work runs with that user's identity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from wrenn.envd.auth import request_user
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import inotify, list_dir, make_dir, move, remove, stat, watch_dir
from wrenn.envd.filesystem.watchers import Watchers
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_connect import Filesystem
from wrenn.gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    CreateWatcherResponse,
    GetWatcherEventsRequest,
    GetWatcherEventsResponse,
    ListDirRequest,
    ListDirResponse,
    MakeDirRequest,
    MakeDirResponse,
    MoveRequest,
    MoveResponse,
    RemoveRequest,
    RemoveResponse,
    RemoveWatcherRequest,
    RemoveWatcherResponse,
    StatRequest,
    StatResponse,
    WatchDirRequest,
    WatchDirResponse,
)


class FilesystemService(Filesystem):
    def __init__(self, defaults: Defaults) -> None:
        self.defaults = defaults
        self.inotify = inotify.Hub()
        self.watchers = Watchers(self.inotify)

    def _user(self, ctx: RequestContext[Any, Any]) -> User:
        return request_user(ctx.request_headers, self.defaults)

    async def stat(
        self, request: StatRequest, ctx: RequestContext[StatRequest, StatResponse], /
    ) -> StatResponse:
        return await stat.stat(request, self._user(ctx), self.defaults)

    async def make_dir(
        self, request: MakeDirRequest, ctx: RequestContext[MakeDirRequest, MakeDirResponse], /
    ) -> MakeDirResponse:
        return await make_dir.make_dir(request, self._user(ctx), self.defaults)

    async def move(
        self, request: MoveRequest, ctx: RequestContext[MoveRequest, MoveResponse], /
    ) -> MoveResponse:
        return await move.move(request, self._user(ctx), self.defaults)

    async def list_dir(
        self, request: ListDirRequest, ctx: RequestContext[ListDirRequest, ListDirResponse], /
    ) -> ListDirResponse:
        return await list_dir.list_dir(request, self._user(ctx), self.defaults)

    async def remove(
        self, request: RemoveRequest, ctx: RequestContext[RemoveRequest, RemoveResponse], /
    ) -> RemoveResponse:
        return await remove.remove(request, self._user(ctx), self.defaults)

    def watch_dir(
        self, request: WatchDirRequest, ctx: RequestContext[WatchDirRequest, WatchDirResponse], /
    ) -> AsyncIterator[WatchDirResponse]:
        user = self._user(ctx)
        return watch_dir.watch_dir(self.inotify, request, user, self.defaults, ctx.request_headers)

    async def create_watcher(
        self,
        request: CreateWatcherRequest,
        ctx: RequestContext[CreateWatcherRequest, CreateWatcherResponse],
        /,
    ) -> CreateWatcherResponse:
        return await self.watchers.create(request, self._user(ctx), self.defaults)

    async def get_watcher_events(
        self,
        request: GetWatcherEventsRequest,
        ctx: RequestContext[GetWatcherEventsRequest, GetWatcherEventsResponse],
        /,
    ) -> GetWatcherEventsResponse:
        return self.watchers.events(request)

    async def remove_watcher(
        self,
        request: RemoveWatcherRequest,
        ctx: RequestContext[RemoveWatcherRequest, RemoveWatcherResponse],
        /,
    ) -> RemoveWatcherResponse:
        return await self.watchers.remove(request)

    async def aclose(self) -> None:
        await self.watchers.aclose()
        self.inotify.close()
