"""CreateWatcher / GetWatcherEvents / RemoveWatcher: watches polled by id (what the
synchronous SDK uses). Events accumulate between polls; the service closes every watcher
still open when envd stops."""

from __future__ import annotations

import secrets

from wrenn.core.errors import NotFound
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import inotify, paths
from wrenn.envd.filesystem.watcher import DirWatcher
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    CreateWatcherResponse,
    GetWatcherEventsRequest,
    GetWatcherEventsResponse,
    RemoveWatcherRequest,
    RemoveWatcherResponse,
)


class Watchers:
    def __init__(self, hub: inotify.Hub) -> None:
        self._hub = hub
        self._open: dict[str, DirWatcher] = {}

    async def create(
        self, request: CreateWatcherRequest, user: User, defaults: Defaults
    ) -> CreateWatcherResponse:
        path = paths.resolve(request.path, user, defaults.workdir)
        watcher = await DirWatcher.open(
            self._hub,
            path,
            user,
            recursive=request.recursive,
            include_entry=request.include_entry,
            allow_network_mounts=request.allow_network_mounts,
        )
        watcher_id = "w" + secrets.token_hex(8)
        self._open[watcher_id] = watcher
        return CreateWatcherResponse(watcher_id=watcher_id)

    def events(self, request: GetWatcherEventsRequest) -> GetWatcherEventsResponse:
        return GetWatcherEventsResponse(events=self._get(request.watcher_id).drain())

    async def remove(self, request: RemoveWatcherRequest) -> RemoveWatcherResponse:
        watcher = self._get(request.watcher_id)
        del self._open[request.watcher_id]
        await watcher.aclose()
        return RemoveWatcherResponse()

    def _get(self, watcher_id: str) -> DirWatcher:
        try:
            return self._open[watcher_id]
        except KeyError:
            raise NotFound(f"watcher with id {watcher_id} not found") from None

    async def aclose(self) -> None:
        while self._open:
            _, watcher = self._open.popitem()
            await watcher.aclose()
